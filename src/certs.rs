//! `peervault certs issue`: mints a pod's service certificate from a CA, at pod start.
//!
//! The Helm chart can generate a CA (with `lookup`, so it survives upgrades) but Helm's template
//! functions cannot write URI SANs, and a service identity *is* a URI SAN
//! (`spiffe://<trust-domain>/peervault/<service>`). So the chart's init container runs this
//! command with the CA mounted, and the server container only ever sees its own leaf.

use std::{fs, net::IpAddr, path::PathBuf};

use anyhow::Context as _;
use clap::Args;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

/// Options of `peervault certs issue`.
#[derive(Args)]
pub struct IssueArgs {
    /// PEM CA certificate that signs the new certificate.
    #[arg(long, env = "PEERVAULT_CA_CERT")]
    ca_cert: PathBuf,
    /// PEM private key of `--ca-cert` (PKCS#8; Ed25519, ECDSA P-256/P-384 or RSA).
    #[arg(long, env = "PEERVAULT_CA_KEY")]
    ca_key: PathBuf,
    /// Service identities the certificate carries (`blob`, `peer`, `events`), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    service: Vec<String>,
    /// DNS names the certificate names (e.g. the pod's stable name and its Services).
    #[arg(long, value_delimiter = ',')]
    dns: Vec<String>,
    /// IP addresses the certificate names (e.g. the pod IP).
    #[arg(long, value_delimiter = ',')]
    ip: Vec<IpAddr>,
    /// SPIFFE trust domain of the identities.
    #[arg(long, env = "PEERVAULT_TRUST_DOMAIN", default_value = "peervault.local")]
    trust_domain: String,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Folder to write `tls.crt`, `tls.key` and `ca.crt` into (created if missing).
    #[arg(long)]
    out: PathBuf,
}

/// Writes a leaf certificate for `args.service` signed by the CA into `args.out`.
pub fn issue(args: &IssueArgs) -> anyhow::Result<()> {
    let ca_pem = fs::read_to_string(&args.ca_cert)
        .with_context(|| format!("cannot read --ca-cert {}", args.ca_cert.display()))?;
    let ca_key_pem =
        fs::read_to_string(&args.ca_key).with_context(|| format!("cannot read --ca-key {}", args.ca_key.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| anyhow::anyhow!("--ca-key {} is not a usable PKCS#8 key: {e}", args.ca_key.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| {
        anyhow::anyhow!(
            "--ca-cert {} is not a usable CA certificate: {e}",
            args.ca_cert.display()
        )
    })?;

    let mut sans = Vec::new();
    for service in &args.service {
        let id = peervault_runtime::tls::service_spiffe_id(&args.trust_domain, service);
        sans.push(SanType::URI(
            id.clone()
                .try_into()
                .map_err(|e| anyhow::anyhow!("bad identity {id}: {e}"))?,
        ));
    }
    for name in &args.dns {
        if !valid_dns_name(name) {
            anyhow::bail!(
                "bad --dns name {name:?}: not a host name (letters, digits, '-', dots; '*.' first for a wildcard)"
            );
        }
        sans.push(SanType::DnsName(
            name.clone()
                .try_into()
                .map_err(|e| anyhow::anyhow!("bad --dns name {name:?}: {e}"))?,
        ));
    }
    sans.extend(args.ip.iter().copied().map(SanType::IpAddress));

    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let cn = args
        .dns
        .first()
        .cloned()
        .unwrap_or_else(|| format!("peervault-{}", args.service.join("-")));
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let now = std::time::SystemTime::now();
    // A day of slack for clocks a little behind the issuer's.
    params.not_before = (now - DAY).into();
    params.not_after = (now + DAY * args.days).into();
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    fs::create_dir_all(&args.out).with_context(|| format!("cannot create --out {}", args.out.display()))?;
    write(&args.out.join("tls.crt"), cert.pem().as_bytes(), false)?;
    write(&args.out.join("tls.key"), key.serialize_pem().as_bytes(), true)?;
    write(&args.out.join("ca.crt"), ca_pem.as_bytes(), false)?;
    eprintln!(
        "peervault certs: wrote {} for {} ({} DNS names, {} IPs)",
        args.out.join("tls.crt").display(),
        args.service.join(","),
        args.dns.len(),
        args.ip.len()
    );
    Ok(())
}

const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);

/// A host name a certificate may name: labels of 1–63 letters, digits and inner hyphens, 253
/// characters at most, optionally a leading `*` label.
fn valid_dns_name(name: &str) -> bool {
    let body = name.strip_prefix("*.").unwrap_or(name);
    !body.is_empty()
        && name.len() <= 253
        && body.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn write(path: &std::path::Path, data: &[u8], secret: bool) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use peervault_runtime::Identity;
    use rustls::pki_types::CertificateDer;

    /// A CA in `dir` (Ed25519 as the chart makes it): returns the cert and key paths.
    fn ca(dir: &std::path::Path) -> (PathBuf, PathBuf) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "test CA");
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = p.self_signed(&key).unwrap();
        let (c, k) = (dir.join("ca.crt"), dir.join("ca.key"));
        fs::write(&c, cert.pem()).unwrap();
        fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn args(ca_cert: PathBuf, ca_key: PathBuf, out: PathBuf) -> IssueArgs {
        IssueArgs {
            ca_cert,
            ca_key,
            service: vec!["blob".into()],
            dns: vec!["blob-0.blob-headless.ns.svc".into()],
            ip: vec!["10.0.0.7".parse().unwrap()],
            trust_domain: "peervault.local".into(),
            days: 30,
            out,
        }
    }

    #[test]
    fn issued_certificates_carry_the_service_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = ca(dir.path());
        issue(&args(c, k, dir.path().join("out"))).unwrap();
        let pem = fs::read(dir.path().join("out/tls.crt")).unwrap();
        let der: CertificateDer<'static> = rustls_pemfile::certs(&mut pem.as_slice()).next().unwrap().unwrap();
        assert_eq!(
            Identity::from_certificate(&der, "peervault.local"),
            Identity::Service {
                service: "blob".into(),
                id: "spiffe://peervault.local/peervault/blob".into()
            }
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("out/tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            fs::read_to_string(dir.path().join("out/ca.crt")).unwrap(),
            fs::read_to_string(dir.path().join("ca.crt")).unwrap()
        );
    }

    #[test]
    fn bad_inputs_are_named_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = ca(dir.path());
        let out = dir.path().join("out");
        let missing = dir.path().join("missing.key");
        let e = issue(&args(c.clone(), missing, out.clone())).unwrap_err();
        assert!(format!("{e:#}").contains("cannot read --ca-key"), "{e:#}");
        let garbage = dir.path().join("garbage.key");
        fs::write(&garbage, "not a key").unwrap();
        let e = issue(&args(c.clone(), garbage, out.clone())).unwrap_err();
        assert!(format!("{e:#}").contains("is not a usable PKCS#8 key"), "{e:#}");
        let e = issue(&args(k.clone(), k.clone(), out.clone())).unwrap_err();
        assert!(format!("{e:#}").contains("is not a usable CA certificate"), "{e:#}");
        let mut bad_dns = args(c, k, out.clone());
        for bad in ["not a name", "$(POD_NAME).blob.ns.svc", "a..b", "-a.b", ""] {
            bad_dns.dns = vec![bad.into()];
            let e = issue(&bad_dns).unwrap_err();
            assert!(format!("{e:#}").contains("bad --dns name"), "{bad:?}: {e:#}");
        }
        assert!(valid_dns_name("*.peervault-blob-headless.ns.svc") && valid_dns_name("localhost"));
        assert!(!out.exists(), "a failed issue wrote files");
    }
}
