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
