//! Mutual TLS: the development CA, loading PEM files, the server config with client
//! verification, hot reload of certificate files, and the client config for calls between
//! services.

use std::{
    fs,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
};
use thiserror::Error;

use crate::{config::ClientAuth, metrics::Metrics};

/// What went wrong with certificates or keys. Each variant names the flag and file so the
/// operator knows what to fix.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {flag} {path}: {source}")]
    Read {
        /// The flag that names the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file was read but holds no usable PEM content.
    #[error("invalid {flag} {path}: {reason}")]
    Invalid {
        /// The flag that names the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The development certificates could not be created.
    #[error("cannot create development certificates in {dir}: {reason}")]
    Generate {
        /// The directory they were to be written to.
        dir: PathBuf,
        /// Why it failed.
        reason: String,
    },
    /// rustls refused the certificate/key combination.
    #[error("TLS configuration rejected: {0}")]
    Config(String),
}

impl TlsError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            TlsError::Read { .. } => "read",
            TlsError::Invalid { .. } => "invalid",
            TlsError::Generate { .. } => "generate",
            TlsError::Config(_) => "config",
        }
    }
}

/// Where the server's certificate, key and client CA come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle that peers' certificates must chain to.
    pub client_ca: PathBuf,
}

/// Names of the files in a development TLS directory (`<data-dir>/tls/`).
pub mod dev_files {
    /// The development CA certificate.
    pub const CA_CERT: &str = "ca.crt";
    /// The server (and service identity) certificate.
    pub const SERVER_CERT: &str = "server.crt";
    /// The server key.
    pub const SERVER_KEY: &str = "server.key";
    /// The development client certificate (a client identity with `admin`).
    pub const CLIENT_CERT: &str = "client.crt";
    /// The development client key.
    pub const CLIENT_KEY: &str = "client.key";
}

/// The services whose SPIFFE identities the development server certificate carries.
pub const SERVICE_NAMES: [&str; 3] = ["blob", "peer", "events"];

/// Creates the development CA and certificates in `dir` unless they already exist, and returns
/// the server's files. Existing files are reused so that nodes started with copies of one folder
/// trust each other.
pub fn ensure_dev_certs(dir: &Path, trust_domain: &str) -> Result<TlsFiles, TlsError> {
    use dev_files::*;
    let files = TlsFiles {
        cert: dir.join(SERVER_CERT),
        key: dir.join(SERVER_KEY),
        client_ca: dir.join(CA_CERT),
    };
    let all = [CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY];
    if all.iter().all(|f| dir.join(f).exists()) {
        return Ok(files);
    }
    let gen_err = |reason: String| TlsError::Generate {
        dir: dir.to_path_buf(),
        reason,
    };
    if let Some(missing) = all.iter().find(|f| !dir.join(f).exists())
        && all.iter().any(|f| dir.join(f).exists())
    {
        // Regenerating would silently split trust with nodes that copied the old folder.
        return Err(gen_err(format!(
            "{missing} is missing but other files exist; remove the folder to start over or restore the file"
        )));
    }
    fs::create_dir_all(dir).map_err(|e| gen_err(e.to_string()))?;
    let set = DevCertSet::generate(trust_domain, &local_host_names()).map_err(|e| gen_err(e.to_string()))?;
    write_file(&dir.join(CA_CERT), set.ca_pem.as_bytes(), false).map_err(gen_err)?;
    write_file(&dir.join(SERVER_CERT), set.server_cert_pem.as_bytes(), false).map_err(gen_err)?;
    write_file(&dir.join(SERVER_KEY), set.server_key_pem.as_bytes(), true).map_err(gen_err)?;
    write_file(&dir.join(CLIENT_CERT), set.client_cert_pem.as_bytes(), false).map_err(gen_err)?;
    write_file(&dir.join(CLIENT_KEY), set.client_key_pem.as_bytes(), true).map_err(gen_err)?;
    tracing::info!(
        dir = %dir.display(),
        "created development CA and certificates; connect with --ca {0}/ca.crt --cert {0}/client.crt --key {0}/client.key",
        dir.display()
    );
    Ok(files)
}

fn local_host_names() -> Vec<String> {
    let mut names = vec!["localhost".to_string()];
    if let Some(h) = hostname::get().ok().and_then(|h| h.into_string().ok())
        && !h.is_empty()
        && h != "localhost"
    {
        names.push(h);
    }
    names
}

/// Writes `data` to `path` atomically: into a temporary file of its own (named after the
/// target, so two PEMs written at once never share one), created with mode 0600 before any byte
/// is written and `create_new` (never following a planted file), then given its final mode and
/// renamed over the target.
fn write_file(path: &Path, data: &[u8], secret: bool) -> Result<(), String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = path.with_file_name(format!(".{name}.{}.{nonce}.tmp", std::process::id()));
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let result = (|| {
        let mut f = opts.open(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(data)
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        #[cfg(unix)]
        if !secret {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(fs::Permissions::from_mode(0o644))
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
        }
        #[cfg(not(unix))]
        let _ = secret;
        fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A development CA with a service certificate and a client certificate, as PEM text.
pub struct DevCertSet {
    /// CA certificate.
    pub ca_pem: String,
    /// Server certificate: names the hosts and carries every service identity.
    pub server_cert_pem: String,
    /// Server key.
    pub server_key_pem: String,
    /// Client certificate (client identity `spiffe://<domain>/client/dev`).
    pub client_cert_pem: String,
    /// Client key.
    pub client_key_pem: String,
}

impl DevCertSet {
    /// Generates a fresh CA and leaves. `hosts` are the DNS names the server certificate names
    /// besides 127.0.0.1 and ::1.
    pub fn generate(trust_domain: &str, hosts: &[String]) -> Result<Self, rcgen::Error> {
        let ca = CaIssuer::generate("PeerVault development CA")?;
        let mut server_sans: Vec<SanType> = hosts
            .iter()
            .filter_map(|h| h.clone().try_into().ok().map(SanType::DnsName))
            .collect();
        server_sans.push(SanType::IpAddress(IpAddr::from([127, 0, 0, 1])));
        server_sans.push(SanType::IpAddress("::1".parse().expect("valid IPv6 literal")));
        for s in SERVICE_NAMES {
            server_sans.push(SanType::URI(service_spiffe_id(trust_domain, s).try_into()?));
        }
        let (server_cert_pem, server_key_pem) = ca.leaf("peervault-server", server_sans)?;
        let client_sans = vec![SanType::URI(format!("spiffe://{trust_domain}/client/dev").try_into()?)];
        let (client_cert_pem, client_key_pem) = ca.leaf("peervault-dev-client", client_sans)?;
        Ok(DevCertSet {
            ca_pem: ca.pem(),
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
        })
    }
}

/// A certificate authority that issues leaf certificates (development CA; also used by tests).
pub struct CaIssuer {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl CaIssuer {
    /// A new self-signed CA valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.distinguished_name.push(DnType::OrganizationName, "PeerVault");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, 10);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(CaIssuer { issuer })
    }

    /// The CA certificate as PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a leaf usable for both server and client authentication; returns (cert, key) PEM.
    pub fn leaf(&self, common_name: &str, sans: Vec<SanType>) -> Result<(String, String), rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, 5);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn set_validity(params: &mut CertificateParams, years: i32) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    // Whole years are precise enough for validity windows; a day of slack absorbs clock skew.
    let year = 1970 + (now / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

/// The SPIFFE id of a PeerVault service: `spiffe://<trust-domain>/peervault/<service>`.
pub fn service_spiffe_id(trust_domain: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/peervault/{service}")
}

/// Reads every certificate of a PEM file.
pub fn read_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            flag,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            flag,
            path: path.to_path_buf(),
            reason: "no PEM CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn read_key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TlsError::Invalid {
            flag,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| TlsError::Invalid {
            flag,
            path: path.to_path_buf(),
            reason: "no PEM PRIVATE KEY block found".into(),
        })
}

fn client_roots(files: &TlsFiles) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in read_certs("--tls-client-ca", &files.client_ca)? {
        roots.add(ca).map_err(|e| TlsError::Invalid {
            flag: "--tls-client-ca",
            path: files.client_ca.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn server_config_with(files: &TlsFiles, client_auth: ClientAuth, alpn: &[u8]) -> Result<ServerConfig, TlsError> {
    let certs = read_certs("--tls-cert", &files.cert)?;
    let key = read_key("--tls-key", &files.key)?;
    let verifier = WebPkiClientVerifier::builder(Arc::new(client_roots(files)?));
    let verifier = match client_auth {
        ClientAuth::Required => verifier,
        ClientAuth::Optional => verifier.allow_unauthenticated(),
    }
    .build()
    .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("certificate and key do not match or are unsupported: {e}")))?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// Builds the rustls server config: our certificate, client verification against the client
/// CA (required or optional), ALPN `h2` for gRPC.
pub fn server_config(files: &TlsFiles, client_auth: ClientAuth) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(files, client_auth, b"h2").map(Arc::new)
}

/// The rustls client config for calls to other PeerVault services: trusts the `--tls-client-ca`
/// bundle, presents `--tls-cert` (this process's service identity), speaks `h2`.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let certs = read_certs("--tls-cert", &files.cert)?;
    let key = read_key("--tls-key", &files.key)?;
    let mut cfg = ClientConfig::builder()
        .with_root_certificates(client_roots(files)?)
        .with_client_auth_cert(certs, key)
        .map_err(|e| {
            TlsError::Config(format!(
                "client certificate and key do not match or are unsupported: {e}"
            ))
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Every TLS config one set of files yields.
struct Configs {
    grpc: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl Configs {
    fn build(files: &TlsFiles, client_auth: ClientAuth) -> Result<Configs, TlsError> {
        Ok(Configs {
            grpc: server_config(files, client_auth)?,
            // Browsers rarely hold client certificates: on the HTTP (WebSocket) port a
            // certificate is one credential among others, so it is asked for but not required.
            http: Arc::new(server_config_with(files, ClientAuth::Optional, b"http/1.1")?),
            client: client_config(files)?,
        })
    }
}

/// The TLS state in force for every listener and every outgoing service channel of the process,
/// swapped as a whole when the files change on disk: the gRPC server config, the HTTP
/// (WebSocket) server config and the client config. Each new connection, accepted or dialled,
/// takes the current one, so rotated certificates and CAs apply without a restart.
pub struct ReloadableServerConfig {
    files: TlsFiles,
    client_auth: ClientAuth,
    current: RwLock<(Arc<Configs>, FileStamp)>,
}

/// The process's reloadable TLS state (servers and clients).
pub type ReloadableTls = ReloadableServerConfig;

/// Contents of the watched files, to tell a real change from a touched mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp(Vec<Option<Vec<u8>>>);

impl FileStamp {
    fn read(files: &TlsFiles) -> Self {
        FileStamp(
            [&files.cert, &files.key, &files.client_ca]
                .iter()
                .map(|p| fs::read(p).ok())
                .collect(),
        )
    }
}

impl ReloadableServerConfig {
    /// Loads the files once; fails if they are unusable.
    pub fn load(files: TlsFiles, client_auth: ClientAuth) -> Result<Arc<Self>, TlsError> {
        let stamp = FileStamp::read(&files);
        let cfg = Configs::build(&files, client_auth)?;
        Ok(Arc::new(ReloadableServerConfig {
            files,
            client_auth,
            current: RwLock::new((Arc::new(cfg), stamp)),
        }))
    }

    fn configs(&self) -> Arc<Configs> {
        match self.current.read() {
            Ok(g) => g.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    /// The gRPC server config to use for the next accepted connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.configs().grpc.clone()
    }

    /// The HTTP/1.1 server config (events WebSocket port) for the next accepted connection;
    /// client certificates are verified when presented and optional.
    pub fn http_current(&self) -> Arc<ServerConfig> {
        self.configs().http.clone()
    }

    /// The client config for the next outgoing connection to another service.
    pub fn client_current(&self) -> Arc<ClientConfig> {
        self.configs().client.clone()
    }

    /// The files this config was built from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Re-reads the files; if their contents changed and they are valid, swaps the config in.
    /// Returns `Ok(true)` when a new config took effect. An invalid new set keeps the old one.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamp = FileStamp::read(&self.files);
        {
            let cur = self.current.read().unwrap_or_else(|p| p.into_inner());
            if cur.1 == stamp {
                return Ok(false);
            }
        }
        let cfg = Configs::build(&self.files, self.client_auth)?;
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        *cur = (Arc::new(cfg), stamp);
        Ok(true)
    }

    /// Polls the files every `interval` until `shutdown` fires, logging and counting each reload.
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        metrics: Metrics,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let this = self.clone();
            let result = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
            match result {
                Ok(Ok(true)) => {
                    last_error = None;
                    metrics.tls_reloads.with_label_values(&["ok"]).inc();
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded from disk");
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    // Log once per distinct error: a half-written rotation is retried each tick.
                    if last_error.as_deref() != Some(&msg) {
                        metrics.tls_reloads.with_label_values(&["error"]).inc();
                        tracing::warn!(error = %msg, "TLS files changed but cannot be loaded; keeping the previous certificate");
                        last_error = Some(msg);
                    }
                }
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certs_are_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let a = ensure_dev_certs(&tls, "peervault.local").unwrap();
        let ca1 = fs::read(&a.client_ca).unwrap();
        let b = ensure_dev_certs(&tls, "peervault.local").unwrap();
        assert_eq!(a, b);
        assert_eq!(ca1, fs::read(&b.client_ca).unwrap());
        server_config(&a, ClientAuth::Required).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn dev_keys_are_private_and_no_temporary_file_is_left() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        ensure_dev_certs(&tls, "peervault.local").unwrap();
        let mode = |f: &str| fs::metadata(tls.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dev_files::SERVER_KEY), 0o600);
        assert_eq!(mode(dev_files::CLIENT_KEY), 0o600);
        assert_eq!(mode(dev_files::SERVER_CERT), 0o644);
        // server.crt and server.key once shared the temporary name server.tmp.
        let names: Vec<_> = fs::read_dir(&tls)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 5, "{names:?}");
        let crt = fs::read_to_string(tls.join(dev_files::SERVER_CERT)).unwrap();
        let key = fs::read_to_string(tls.join(dev_files::SERVER_KEY)).unwrap();
        assert!(crt.contains("CERTIFICATE") && !crt.contains("PRIVATE KEY"));
        assert!(key.contains("PRIVATE KEY") && !key.contains("CERTIFICATE"));
    }

    #[test]
    fn writing_again_replaces_the_file_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x.key");
        write_file(&target, b"secret", true).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"secret");
        // Writing again replaces the file atomically.
        write_file(&target, b"other", true).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"other");
    }

    #[test]
    fn a_partial_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        ensure_dev_certs(&tls, "peervault.local").unwrap();
        fs::remove_file(tls.join(dev_files::SERVER_KEY)).unwrap();
        let err = ensure_dev_certs(&tls, "peervault.local").unwrap_err().to_string();
        assert!(err.contains("server.key is missing"), "{err}");
    }

    #[test]
    fn errors_name_flag_and_file() {
        let err = read_certs("--tls-cert", Path::new("/nonexistent/x.crt"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--tls-cert") && err.contains("/nonexistent/x.crt"),
            "{err}"
        );
    }

    #[test]
    fn reload_picks_up_new_files_and_keeps_old_on_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let files = ensure_dev_certs(&dir.path().join("tls"), "peervault.local").unwrap();
        let r = ReloadableServerConfig::load(files.clone(), ClientAuth::Required).unwrap();
        assert!(!r.reload_if_changed().unwrap());
        fs::write(&files.cert, b"garbage").unwrap();
        assert!(r.reload_if_changed().is_err());
        let set = DevCertSet::generate("peervault.local", &["localhost".into()]).unwrap();
        fs::write(&files.cert, set.server_cert_pem).unwrap();
        fs::write(&files.key, set.server_key_pem).unwrap();
        fs::write(&files.client_ca, set.ca_pem).unwrap();
        assert!(r.reload_if_changed().unwrap());
    }
}
