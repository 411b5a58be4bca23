//! The events service's settings, resolved once at start-up: flags and `PEERVAULT_*`
//! variables first, then the YAML file of `--events-config` (the published `websocket:`
//! section), then the published defaults.

use std::{net::SocketAddr, path::Path, time::Duration};

use peervault_runtime::ServeConfig;
use serde::Deserialize;

/// Which browser origins may open WebSockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    /// Every origin (`*`, or `cors.enabled: false`).
    Any,
    /// These origins, or the page's own (same host as the request).
    List(Vec<String>),
}

impl Origins {
    fn parse(list: &[String]) -> Origins {
        let items: Vec<String> = list
            .iter()
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if items.iter().any(|s| s == "*") {
            Origins::Any
        } else {
            Origins::List(items)
        }
    }

    /// Whether a request with `origin` (the `Origin` header) and `host` (the `Host` header)
    /// may connect. Requests without `Origin` come from non-browser clients and are allowed.
    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        match self {
            Origins::Any => true,
            Origins::List(list) => {
                let origin = origin.trim_end_matches('/');
                if list.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
                    return true;
                }
                // Same origin: the page was served by this host.
                let bare = origin.split_once("://").map(|(_, h)| h).unwrap_or(origin);
                host.is_some_and(|h| h.eq_ignore_ascii_case(bare))
            }
        }
    }
}

/// WebSocket gateway settings.
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// Host of the gateway's address (name or IP).
    pub host: String,
    /// Port of the gateway's address (0: a free one).
    pub port: u16,
    /// Allowed origins.
    pub origins: Origins,
    /// Time to send the upgrade request (and the auth message when token auth is on).
    pub read_timeout: Duration,
    /// Time allowed for each write to a client.
    pub write_timeout: Duration,
    /// Interval of server pings.
    pub ping_period: Duration,
    /// Silence after which a connection is closed.
    pub pong_wait: Duration,
    /// Most concurrent connections.
    pub max_connections: usize,
    /// Largest client message in bytes.
    pub max_message_size: usize,
    /// Client messages per second.
    pub messages_per_second: u32,
    /// Most concurrent connections from one client address.
    pub max_connections_per_address: usize,
    /// Whether clients without credentials are admitted (`--ws-allow-anonymous`).
    pub allow_anonymous: bool,
}

/// Alert thresholds.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    /// Storage usage percent.
    pub storage_usage_percent: f64,
    /// Memory usage percent.
    pub memory_usage_percent: f64,
    /// Replication backlog.
    pub replication_backlog: f64,
    /// Authentication failures per window.
    pub auth_failures: u32,
    /// The window of `auth_failures`.
    pub auth_failure_window: Duration,
}

/// Everything the events service is configured with.
#[derive(Debug, Clone)]
pub struct EventsSettings {
    /// The gateway.
    pub ws: WsSettings,
    /// Events kept for replay.
    pub replay_capacity: usize,
    /// Events a subscriber may fall behind.
    pub subscriber_queue: usize,
    /// Alert thresholds.
    pub alerts: AlertSettings,
    /// How often this pod publishes its own metrics events (zero: never).
    pub metrics_interval: Duration,
}

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The config file cannot be read.
    #[error("cannot read --events-config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config file is not valid.
    #[error("invalid --events-config {path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A value out of range.
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    #[serde(default)]
    websocket: WsFile,
    #[serde(default)]
    events: EventsFile,
    #[serde(default)]
    alerts: AlertsFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WsFile {
    port: Option<u16>,
    host: Option<String>,
    #[serde(default)]
    cors: CorsFile,
    #[serde(default)]
    timeouts: TimeoutsFile,
    #[serde(default)]
    limits: LimitsFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CorsFile {
    enabled: Option<bool>,
    origins: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutsFile {
    read: Option<String>,
    write: Option<String>,
    ping_period: Option<String>,
    pong_wait: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_connections: Option<u32>,
    max_message_size: Option<u32>,
    messages_per_second: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsFile {
    replay_buffer: Option<u32>,
    subscriber_queue: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertsFile {
    storage_usage_percent: Option<f64>,
    memory_usage_percent: Option<f64>,
    replication_backlog: Option<f64>,
    auth_failures: Option<u32>,
    auth_failure_window: Option<String>,
}

fn file_duration(path: &str, key: &str, v: &Option<String>) -> Result<Option<Duration>, SettingsError> {
    v.as_deref()
        .map(|s| {
            humantime::parse_duration(s.trim()).map_err(|e| SettingsError::Parse {
                path: path.to_string(),
                reason: format!("{key}: {e} (examples: 30s, 500ms)"),
            })
        })
        .transpose()
}

impl EventsSettings {
    /// Resolves the settings from the process's flags and, when given, its `--events-config`.
    pub fn resolve(cfg: &ServeConfig) -> Result<EventsSettings, SettingsError> {
        let f = &cfg.events;
        let (file, path) = match &f.events_config {
            Some(p) => (read_file(p)?, p.display().to_string()),
            None => (FileConfig::default(), String::new()),
        };
        let ws = &file.websocket;
        let origins = match (&f.ws_cors_origins, ws.cors.enabled, &ws.cors.origins) {
            (Some(list), _, _) => Origins::parse(&list.split(',').map(str::to_string).collect::<Vec<_>>()),
            (None, Some(false), _) => Origins::Any,
            (None, _, Some(list)) => Origins::parse(list),
            // No origin beyond the page's own unless listed: any web page a user visits could
            // otherwise read the events with the user's browser.
            (None, _, None) => Origins::List(vec![]),
        };
        let http = cfg.http_listen;
        let timeouts = &ws.timeouts;
        let settings = EventsSettings {
            ws: WsSettings {
                host: f
                    .ws_host
                    .clone()
                    .or_else(|| ws.host.clone())
                    .unwrap_or_else(|| http.ip().to_string()),
                port: f.ws_port.or(ws.port).unwrap_or(http.port()),
                origins,
                read_timeout: f
                    .ws_read_timeout
                    .or(file_duration(&path, "websocket.timeouts.read", &timeouts.read)?)
                    .unwrap_or(Duration::from_secs(30)),
                write_timeout: f
                    .ws_write_timeout
                    .or(file_duration(&path, "websocket.timeouts.write", &timeouts.write)?)
                    .unwrap_or(Duration::from_secs(30)),
                ping_period: f
                    .ws_ping_period
                    .or(file_duration(
                        &path,
                        "websocket.timeouts.ping_period",
                        &timeouts.ping_period,
                    )?)
                    .unwrap_or(Duration::from_secs(54)),
                pong_wait: f
                    .ws_pong_wait
                    .or(file_duration(
                        &path,
                        "websocket.timeouts.pong_wait",
                        &timeouts.pong_wait,
                    )?)
                    .unwrap_or(Duration::from_secs(60)),
                max_connections: f.ws_max_connections.or(ws.limits.max_connections).unwrap_or(1000) as usize,
                max_message_size: f
                    .ws_max_message_size
                    .or(ws.limits.max_message_size)
                    .unwrap_or(1024 * 1024) as usize,
                messages_per_second: f
                    .ws_messages_per_second
                    .or(ws.limits.messages_per_second)
                    .unwrap_or(100),
                max_connections_per_address: f.ws_max_connections_per_address.unwrap_or(100) as usize,
                allow_anonymous: cfg.ws_allow_anonymous,
            },
            replay_capacity: f.events_replay_buffer.or(file.events.replay_buffer).unwrap_or(10_000) as usize,
            subscriber_queue: f
                .events_subscriber_queue
                .or(file.events.subscriber_queue)
                .unwrap_or(1024) as usize,
            alerts: AlertSettings {
                storage_usage_percent: f
                    .alert_storage_usage_percent
                    .or(file.alerts.storage_usage_percent)
                    .unwrap_or(90.0),
                memory_usage_percent: f
                    .alert_memory_usage_percent
                    .or(file.alerts.memory_usage_percent)
                    .unwrap_or(90.0),
                replication_backlog: f
                    .alert_replication_backlog
                    .or(file.alerts.replication_backlog)
                    .unwrap_or(1000.0),
                auth_failures: f.alert_auth_failures.or(file.alerts.auth_failures).unwrap_or(10),
                auth_failure_window: f
                    .alert_auth_failure_window
                    .or(file_duration(
                        &path,
                        "alerts.auth_failure_window",
                        &file.alerts.auth_failure_window,
                    )?)
                    .unwrap_or(Duration::from_secs(60)),
            },
            metrics_interval: f.metrics_interval,
        };
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> Result<(), SettingsError> {
        let ws = &self.ws;
        let bad = |m: &str| Err(SettingsError::Invalid(m.to_string()));
        if ws.max_connections == 0 {
            return bad("--ws-max-connections must be at least 1");
        }
        if ws.max_connections_per_address == 0 {
            return bad("--ws-max-connections-per-address must be at least 1");
        }
        if ws.allow_anonymous && ws.origins == Origins::Any {
            return bad(
                "--ws-allow-anonymous cannot be combined with every origin allowed (--ws-cors-origins '*' or cors.enabled: false): any web page could read the events; list the origins",
            );
        }
        if ws.max_message_size < 64 {
            return bad("--ws-max-message-size must be at least 64 bytes");
        }
        if ws.messages_per_second == 0 {
            return bad("--ws-messages-per-second must be at least 1");
        }
        if ws.ping_period.is_zero() || ws.pong_wait <= ws.ping_period {
            return bad("--ws-pong-wait must be longer than --ws-ping-period (published: 54s and 60s)");
        }
        if ws.read_timeout.is_zero() || ws.write_timeout.is_zero() {
            return bad("--ws-read-timeout and --ws-write-timeout must be above zero");
        }
        if self.replay_capacity == 0 || self.subscriber_queue == 0 {
            return bad("--events-replay-buffer and --events-subscriber-queue must be at least 1");
        }
        Ok(())
    }

    /// The address the gateway binds, resolving a host name.
    pub async fn ws_addr(&self) -> Result<SocketAddr, SettingsError> {
        let target = if self.ws.host.contains(':') && !self.ws.host.starts_with('[') {
            format!("[{}]:{}", self.ws.host, self.ws.port)
        } else {
            format!("{}:{}", self.ws.host, self.ws.port)
        };
        let mut addrs = tokio::net::lookup_host(&target)
            .await
            .map_err(|e| SettingsError::Invalid(format!("cannot resolve --ws-host {}: {e}", self.ws.host)))?;
        addrs
            .next()
            .ok_or_else(|| SettingsError::Invalid(format!("--ws-host {} has no address", self.ws.host)))
    }
}

fn read_file(p: &Path) -> Result<FileConfig, SettingsError> {
    let path = p.display().to_string();
    let text = std::fs::read_to_string(p).map_err(|source| SettingsError::Read {
        path: path.clone(),
        source,
    })?;
    serde_saphyr::from_str::<FileConfig>(&text).map_err(|e| SettingsError::Parse {
        path,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: ServeConfig,
    }

    fn cfg(args: &[&str]) -> ServeConfig {
        let mut v = vec!["x"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().cfg
    }

    #[test]
    fn defaults_are_the_published_ones() {
        let s = EventsSettings::resolve(&cfg(&[])).unwrap();
        assert_eq!(s.ws.port, 8083);
        assert_eq!(s.ws.read_timeout, Duration::from_secs(30));
        assert_eq!(s.ws.write_timeout, Duration::from_secs(30));
        assert_eq!(s.ws.ping_period, Duration::from_secs(54));
        assert_eq!(s.ws.pong_wait, Duration::from_secs(60));
        assert_eq!(s.ws.max_connections, 1000);
        assert_eq!(s.ws.max_message_size, 1 << 20);
        assert_eq!(s.ws.messages_per_second, 100);
        // No origin beyond the page's own, credentials required.
        assert_eq!(s.ws.origins, Origins::List(vec![]));
        assert!(!s.ws.allow_anonymous);
        assert_eq!(s.ws.max_connections_per_address, 100);
    }

    #[test]
    fn anonymous_access_is_never_combined_with_every_origin() {
        let err = EventsSettings::resolve(&cfg(&["--ws-allow-anonymous", "--ws-cors-origins", "*"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--ws-allow-anonymous"), "{err}");
        let s = EventsSettings::resolve(&cfg(&[
            "--ws-allow-anonymous",
            "--ws-cors-origins",
            "https://a.example",
        ]))
        .unwrap();
        assert!(s.ws.allow_anonymous);
        assert!(EventsSettings::resolve(&cfg(&["--ws-cors-origins", "*"])).is_ok());
    }

    #[test]
    fn the_yaml_file_applies_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.yaml");
        std::fs::write(
            &p,
            "websocket:\n  port: 9999\n  host: localhost\n  cors:\n    enabled: true\n    origins: [\"https://a.example\"]\n  timeouts:\n    read: 5s\n    write: 6s\n    ping_period: 7s\n    pong_wait: 8s\n  limits:\n    max_connections: 3\n    max_message_size: 2048  # bytes\n    messages_per_second: 5\nalerts:\n  storage_usage_percent: 75\n",
        )
        .unwrap();
        let path = p.to_str().unwrap();
        let s = EventsSettings::resolve(&cfg(&["--events-config", path])).unwrap();
        assert_eq!((s.ws.port, s.ws.host.as_str()), (9999, "localhost"));
        assert_eq!(s.ws.origins, Origins::List(vec!["https://a.example".into()]));
        assert_eq!(s.ws.read_timeout, Duration::from_secs(5));
        assert_eq!(s.ws.pong_wait, Duration::from_secs(8));
        assert_eq!(
            (s.ws.max_connections, s.ws.max_message_size, s.ws.messages_per_second),
            (3, 2048, 5)
        );
        assert_eq!(s.alerts.storage_usage_percent, 75.0);
        let s = EventsSettings::resolve(&cfg(&[
            "--events-config",
            path,
            "--ws-port",
            "1234",
            "--ws-max-connections",
            "9",
        ]))
        .unwrap();
        assert_eq!((s.ws.port, s.ws.max_connections), (1234, 9));

        std::fs::write(&p, "websocket:\n  limits:\n    max_conections: 3\n").unwrap();
        let err = EventsSettings::resolve(&cfg(&["--events-config", path]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--events-config") && err.contains("max_conections"),
            "{err}"
        );
        std::fs::write(&p, "websocket:\n  timeouts:\n    read: soon\n").unwrap();
        let err = EventsSettings::resolve(&cfg(&["--events-config", path]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("websocket.timeouts.read"), "{err}");
    }

    #[test]
    fn origins_are_checked_against_the_list_or_the_host() {
        let o = Origins::parse(&["https://a.example".into()]);
        assert!(o.allows(None, None));
        assert!(o.allows(Some("https://a.example"), Some("x:1")));
        assert!(!o.allows(Some("https://evil.example"), Some("x:1")));
        assert!(o.allows(Some("http://x:1"), Some("x:1")));
        assert!(Origins::parse(&["*".into()]).allows(Some("https://evil.example"), None));
    }

    #[test]
    fn nonsense_values_are_refused() {
        let err = EventsSettings::resolve(&cfg(&["--ws-ping-period", "70s"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--ws-pong-wait"), "{err}");
        assert!(EventsSettings::resolve(&cfg(&["--ws-max-connections", "0"])).is_err());
    }
}
