//! Who is calling: derived from the verified client certificate's subject alternative names.

use std::{
    fmt,
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use rustls::pki_types::CertificateDer;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// The authenticated identity of a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A PeerVault service: a verified certificate with the URI SAN
    /// `spiffe://<trust-domain>/peervault/<service>`. Services may call internal RPCs.
    Service {
        /// `blob`, `peer` or `events` (the first such SAN).
        service: String,
        /// The full SPIFFE id.
        id: String,
    },
    /// Any other verified certificate: a client, named by its first URI SAN, else its first DNS
    /// SAN, else its subject common name.
    Client {
        /// The name the identity is known by in logs and scope mappings.
        id: String,
        /// All SANs, for scope mapping by SAN.
        sans: Vec<String>,
    },
    /// A caller authenticated by an API key.
    ApiKey {
        /// The key's id (never the secret).
        id: String,
        /// The key's name.
        name: String,
    },
    /// A caller authenticated by a JWT.
    Jwt {
        /// The token's subject.
        subject: String,
    },
    /// No credential was presented (possible with `--tls-client-auth optional`).
    Anonymous,
    /// The server runs with `--insecure`: nothing can be verified and every caller is trusted.
    Insecure,
}

impl Identity {
    /// Whether this identity may call internal RPCs.
    pub fn is_service(&self) -> bool {
        matches!(self, Identity::Service { .. } | Identity::Insecure)
    }

    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Identity::Service { .. } => "service",
            Identity::Client { .. } => "client",
            Identity::ApiKey { .. } => "api_key",
            Identity::Jwt { .. } => "jwt",
            Identity::Anonymous => "anonymous",
            Identity::Insecure => "insecure",
        }
    }

    /// Derives the identity from a verified end-entity certificate (DER).
    pub fn from_certificate(cert: &CertificateDer<'_>, trust_domain: &str) -> Identity {
        let Ok((_, parsed)) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref()) else {
            // rustls verified the chain, so this only happens for exotic encodings.
            return Identity::Client {
                id: "unparsable-certificate".into(),
                sans: vec![],
            };
        };
        let mut uris = Vec::new();
        let mut dns = Vec::new();
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    GeneralName::DNSName(d) => dns.push(d.to_string()),
                    _ => {}
                }
            }
        }
        let prefix = format!("spiffe://{trust_domain}/peervault/");
        // Only the three PeerVault services are service identities; `…/peervault/<anything
        // else>` is an ordinary client (a CA that issues such names must not mint services).
        if let Some(id) = uris.iter().find(|u| {
            u.strip_prefix(&prefix)
                .is_some_and(|s| crate::tls::SERVICE_NAMES.contains(&s))
        }) {
            return Identity::Service {
                service: id[prefix.len()..].to_string(),
                id: id.clone(),
            };
        }
        let cn = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .map(str::to_string);
        let id = uris
            .first()
            .or(dns.first())
            .cloned()
            .or(cn)
            .unwrap_or_else(|| "unnamed-certificate".into());
        let sans = uris.into_iter().chain(dns).collect();
        Identity::Client { id, sans }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Service { id, .. } | Identity::Client { id, .. } => f.write_str(id),
            Identity::ApiKey { id, name } => write!(f, "api key {name} ({id})"),
            Identity::Jwt { subject } => write!(f, "jwt subject {subject}"),
            Identity::Anonymous => f.write_str("anonymous"),
            Identity::Insecure => f.write_str("insecure"),
        }
    }
}

/// Facts about the connection a request arrived on, set by the runtime's acceptor and read by
/// the auth layer. Handlers read [`Caller`] instead.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub remote_addr: Option<SocketAddr>,
    /// The verified certificate chain the client presented, if any.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// Whether the connection is plaintext (`--insecure`).
    pub insecure: bool,
    /// The identity derived from `peer_certs`, parsed on the connection's first call and shared
    /// by every later one (the certificate cannot change within a connection), keyed by the
    /// trust domain it was derived under.
    cert_identity: Arc<OnceLock<(String, Identity)>>,
}

impl ConnInfo {
    /// Facts about a new connection from `remote_addr` (`peer_certs`: the verified chain).
    pub fn new(
        remote_addr: Option<SocketAddr>,
        peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
        insecure: bool,
    ) -> ConnInfo {
        ConnInfo {
            remote_addr,
            peer_certs,
            insecure,
            cert_identity: Arc::default(),
        }
    }

    /// The identity of the end-entity certificate under `trust_domain`, parsed once per
    /// connection (`None`: no certificate).
    pub fn certificate_identity(&self, trust_domain: &str) -> Option<Identity> {
        let cert = self.peer_certs.as_ref()?.first()?;
        let (domain, id) = self
            .cert_identity
            .get_or_init(|| (trust_domain.to_string(), Identity::from_certificate(cert, trust_domain)));
        if domain == trust_domain {
            Some(id.clone())
        } else {
            Some(Identity::from_certificate(cert, trust_domain))
        }
    }
}

/// The caller of a request, established by the auth layer and available to handlers through
/// `request.extensions().get::<Caller>()`.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who is calling.
    pub identity: Identity,
    /// From where.
    pub remote_addr: Option<SocketAddr>,
    /// What the caller may do.
    pub scopes: crate::auth::ScopeSet,
    /// The key prefix the caller is limited to (files outside it are invisible to it).
    pub key_prefix: Option<String>,
    /// When the credential stops being valid (a JWT's `exp`, an API key's expiry): streams the
    /// caller opened end then.
    pub valid_until: Option<std::time::SystemTime>,
}

impl Caller {
    /// Whether the caller may see or touch the file `key`.
    pub fn may_access_key(&self, key: &str) -> bool {
        self.key_prefix.as_deref().is_none_or(|p| key.starts_with(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::DevCertSet;

    fn der(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap()
    }

    #[test]
    fn a_connection_parses_its_certificate_once_per_trust_domain() {
        let set = DevCertSet::generate("peervault.local", &["localhost".into()]).unwrap();
        let conn = ConnInfo::new(None, Some(Arc::new(vec![der(&set.server_cert_pem)])), false);
        let first = conn.certificate_identity("peervault.local").unwrap();
        assert!(first.is_service());
        // Clones (one per request) share the parsed identity.
        let again = conn.clone().certificate_identity("peervault.local").unwrap();
        assert_eq!(again, first);
        assert!(conn.cert_identity.get().is_some());
        // Another trust domain is never answered from the cache: there the name is no service.
        let other = conn.certificate_identity("elsewhere.example").unwrap();
        assert!(!other.is_service());
        assert_eq!(
            ConnInfo::new(None, None, false).certificate_identity("peervault.local"),
            None
        );
    }

    #[test]
    fn dev_server_cert_is_a_service_and_dev_client_cert_is_a_client() {
        let set = DevCertSet::generate("peervault.local", &["localhost".into()]).unwrap();
        let server = Identity::from_certificate(&der(&set.server_cert_pem), "peervault.local");
        assert!(matches!(&server, Identity::Service { service, .. } if service == "blob"));
        assert!(server.is_service());
        let client = Identity::from_certificate(&der(&set.client_cert_pem), "peervault.local");
        assert_eq!(client.to_string(), "spiffe://peervault.local/client/dev");
        assert!(!client.is_service());
    }

    #[test]
    fn only_the_three_services_are_service_identities() {
        let ca = crate::tls::CaIssuer::generate("t").unwrap();
        for (name, service) in [
            ("blob", true),
            ("peer", true),
            ("events", true),
            ("admin", false),
            ("x", false),
        ] {
            let san = rcgen::SanType::URI(format!("spiffe://peervault.local/peervault/{name}").try_into().unwrap());
            let (pem, _) = ca.leaf("c", vec![san]).unwrap();
            let id = Identity::from_certificate(&der(&pem), "peervault.local");
            assert_eq!(id.is_service(), service, "{name}: {id:?}");
        }
    }

    #[test]
    fn a_service_id_of_another_trust_domain_is_only_a_client() {
        let set = DevCertSet::generate("other.domain", &["localhost".into()]).unwrap();
        let id = Identity::from_certificate(&der(&set.server_cert_pem), "peervault.local");
        assert!(!id.is_service(), "{id:?}");
    }
}
