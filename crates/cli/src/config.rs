//! Connection settings from flags, `PEERVAULT_*` environment variables and a config file, in
//! that order of precedence, then the defaults of DESIGN.md's operator contract.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Args, ValueEnum};
use peervault_client::{Client, ClientConfig, Compression, RetryPolicy, TlsConfig};
use serde::Deserialize;

use crate::{Ui, usage};

/// Default server address (the operator contract).
const DEFAULT_SERVER: &str = "localhost:8082";
/// Default TLS folder: what `peervault serve all` creates in the current folder.
const DEFAULT_TLS_DIR: &str = "./data/tls";

/// Compression choice on the command line.
#[derive(Debug, Clone, Copy, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionArg {
    /// No compression.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// Connection flags, shared by every command.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Server address HOST:PORT [default: localhost:8082].
    #[arg(long, global = true, env = "PEERVAULT_SERVER", value_name = "HOST:PORT")]
    pub server: Option<String>,
    /// Folder with ca.crt, client.crt and client.key [default: ./data/tls].
    #[arg(long, global = true, env = "PEERVAULT_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// CA certificate (PEM) that signed the server's certificate; overrides the TLS folder's.
    #[arg(long, global = true, env = "PEERVAULT_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM); overrides the TLS folder's.
    #[arg(long, global = true, env = "PEERVAULT_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM); overrides the TLS folder's.
    #[arg(
        long = "key",
        id = "tls_key",
        global = true,
        env = "PEERVAULT_KEY",
        value_name = "FILE"
    )]
    pub tls_key: Option<PathBuf>,
    /// Bearer token (API key `pvk_…` or JWT) sent with every call.
    #[arg(long, global = true, env = "PEERVAULT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Name to verify the server certificate against [default: the host of --server].
    #[arg(long, global = true, env = "PEERVAULT_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Plaintext (only for a server started with --insecure).
    #[arg(long, global = true, env = "PEERVAULT_INSECURE")]
    pub insecure: bool,
    /// Deadline of each call, e.g. 30s [default: 30s].
    #[arg(long, global = true, env = "PEERVAULT_TIMEOUT", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Retries of UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED, with exponential
    /// backoff and jitter [default: 5].
    #[arg(long, global = true, env = "PEERVAULT_RETRIES")]
    pub retries: Option<u32>,
    /// Compress requests [default: none].
    #[arg(long, global = true, env = "PEERVAULT_COMPRESSION", value_enum)]
    pub compression: Option<CompressionArg>,
    /// Config file (YAML) [default: $XDG_CONFIG_HOME/pvault/config.yaml or
    /// ~/.config/pvault/config.yaml, when present].
    #[arg(long, global = true, env = "PEERVAULT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where interrupted resumable uploads are remembered [default: $XDG_STATE_HOME/pvault or
    /// ~/.local/state/pvault].
    #[arg(long, global = true, env = "PEERVAULT_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// W3C trace context to continue (sent as `traceparent` with every call).
    #[arg(long, global = true, env = "TRACEPARENT", hide = true)]
    pub traceparent: Option<String>,
}

/// The config file's keys; each is the flag's name with `_` for `-`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    server: Option<String>,
    tls_dir: Option<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    token: Option<String>,
    tls_server_name: Option<String>,
    insecure: Option<bool>,
    #[serde(default, with = "opt_duration")]
    timeout: Option<Duration>,
    retries: Option<u32>,
    compression: Option<CompressionArg>,
    state_dir: Option<PathBuf>,
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The settings in force after merging every source.
#[derive(Debug)]
pub struct Settings {
    pub server: String,
    pub tls: TlsConfig,
    pub insecure: bool,
    pub token: Option<String>,
    pub timeout: Duration,
    pub retries: u32,
    pub compression: Compression,
    pub state_dir: PathBuf,
    pub traceparent: Option<String>,
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from)
}

fn default_config_path() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".config")))
        .map(|d| d.join("pvault").join("config.yaml"))
}

fn default_state_dir() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".local").join("state")))
        .unwrap_or_else(std::env::temp_dir)
        .join("pvault")
}

impl Settings {
    /// Merges flags/env (already in `args`), the config file and the defaults.
    pub fn resolve(args: &ConnectArgs) -> anyhow::Result<Settings> {
        let file = match &args.config {
            Some(p) => Some(read_config(p)?),
            None => match default_config_path() {
                Some(p) if p.is_file() => Some(read_config(&p)?),
                _ => None,
            },
        }
        .unwrap_or_default();
        let tls_dir = args
            .tls_dir
            .clone()
            .or(file.tls_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_TLS_DIR));
        let from_dir = TlsConfig::from_dir(&tls_dir);
        let tls = TlsConfig {
            ca: args.ca.clone().or(file.ca).or(from_dir.ca),
            cert: args.cert.clone().or(file.cert).or(from_dir.cert),
            key: args.tls_key.clone().or(file.key).or(from_dir.key),
            server_name: args.tls_server_name.clone().or(file.tls_server_name),
        };
        let token = args.token.clone().or(file.token).filter(|t| !t.is_empty());
        // With a token and no client certificate in the folder, connect without one.
        let tls = match (&token, &tls.cert) {
            (Some(_), Some(c)) if args.cert.is_none() && !c.exists() => TlsConfig {
                cert: None,
                key: None,
                ..tls
            },
            _ => tls,
        };
        Ok(Settings {
            server: args
                .server
                .clone()
                .or(file.server)
                .unwrap_or_else(|| DEFAULT_SERVER.to_string()),
            tls,
            insecure: args.insecure || file.insecure.unwrap_or(false),
            token,
            timeout: args.timeout.or(file.timeout).unwrap_or(Duration::from_secs(30)),
            retries: args.retries.or(file.retries).unwrap_or(5),
            compression: match args.compression.or(file.compression).unwrap_or(CompressionArg::None) {
                CompressionArg::None => Compression::None,
                CompressionArg::Gzip => Compression::Gzip,
                CompressionArg::Zstd => Compression::Zstd,
            },
            state_dir: args
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(default_state_dir),
            traceparent: args.traceparent.clone().filter(|t| !t.is_empty()),
        })
    }

    /// Builds the client; retries are reported on stderr unless `--quiet`.
    pub fn client(&self, ui: &Ui) -> anyhow::Result<Client> {
        let quiet = ui.quiet;
        let retry = RetryPolicy {
            max_retries: self.retries,
            observer: Some(Arc::new(
                move |what: &str, attempt, status: &peervault_client::tonic::Status, delay| {
                    if !quiet {
                        eprintln!(
                            "pvault: {what}: {:?} ({}); retry {attempt} in {:.1}s",
                            status.code(),
                            status.message().lines().next().unwrap_or(""),
                            delay.as_secs_f64()
                        );
                    }
                },
            )),
            ..Default::default()
        };
        let mut cfg = ClientConfig::new(self.server.clone())
            .tls(self.tls.clone())
            .timeout(self.timeout)
            .retry(retry)
            .compression(self.compression);
        cfg.insecure = self.insecure;
        cfg.token = self.token.clone();
        if let Some(tp) = self.traceparent.clone() {
            cfg = cfg.traceparent(Arc::new(move || Some(tp.clone())));
        }
        Ok(Client::connect(cfg)?)
    }
}

fn read_config(path: &std::path::Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
    serde_saphyr::from_str::<FileConfig>(&text)
        .map_err(|e| usage(format!("invalid config file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> ConnectArgs {
        ConnectArgs {
            server: None,
            tls_dir: None,
            ca: None,
            cert: None,
            tls_key: None,
            token: None,
            tls_server_name: None,
            insecure: false,
            timeout: None,
            retries: None,
            compression: None,
            config: None,
            state_dir: None,
            traceparent: None,
        }
    }

    #[test]
    fn flags_win_over_the_config_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.yaml");
        std::fs::write(&p, "server: filehost:1\ntls_dir: /etc/pv\ntimeout: 5s\nretries: 2\n").unwrap();
        let mut a = empty();
        a.config = Some(p.clone());
        let s = Settings::resolve(&a).unwrap();
        assert_eq!(s.server, "filehost:1");
        assert_eq!(s.tls.ca, Some(PathBuf::from("/etc/pv/ca.crt")));
        assert_eq!(s.timeout, Duration::from_secs(5));
        assert_eq!(s.retries, 2);
        a.server = Some("flag:2".into());
        a.ca = Some("/x/ca.pem".into());
        let s = Settings::resolve(&a).unwrap();
        assert_eq!(s.server, "flag:2");
        assert_eq!(s.tls.ca, Some(PathBuf::from("/x/ca.pem")));
        assert_eq!(s.tls.cert, Some(PathBuf::from("/etc/pv/client.crt")));
        std::fs::write(&p, "srv: typo\n").unwrap();
        assert!(Settings::resolve(&a).is_err());
    }

    #[test]
    fn defaults_follow_the_operator_contract() {
        let mut a = empty();
        a.config = None;
        let s = Settings::resolve(&a).unwrap();
        if std::env::var_os("PEERVAULT_SERVER").is_none() {
            assert_eq!(s.server, "localhost:8082");
        }
        assert_eq!(s.tls.key, Some(PathBuf::from("./data/tls/client.key")));
    }
}
