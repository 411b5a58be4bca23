//! `pvault`: the PeerVault command-line client. Built on `peervault-client`; links no server
//! code. With no flags it reaches a `peervault serve all` started in the same folder
//! (`localhost:8082`, certificates in `./data/tls`).
#![forbid(unsafe_code)]

mod bench;
mod config;
mod state;

use std::{
    collections::HashMap,
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, anyhow};
use clap::{CommandFactory, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use peervault_client::{
    Client, ErrorKind, EventFilter, Progress, PutOptions, UploadOptions, hex,
    proto::{Event, FileResponse, event::Payload},
};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWriteExt};

use crate::config::ConnectArgs;

/// Exit codes scripts can rely on.
mod exit {
    pub const GENERIC: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NOT_FOUND: u8 = 3;
    pub const AUTH: u8 = 4;
    pub const UNAVAILABLE: u8 = 5;
    pub const REJECTED: u8 = 6;
    pub const QUOTA: u8 = 7;
    pub const INTEGRITY: u8 = 8;
    pub const IO: u8 = 9;
}

#[derive(Parser)]
#[command(
    name = "pvault",
    version,
    about = "PeerVault command-line client",
    after_help = "Exit codes: 0 ok, 1 other error, 2 usage or configuration, 3 not found, 4 authentication/TLS, \
5 server unavailable or timed out, 6 request rejected (invalid, exists, precondition), 7 quota or size limit, \
8 integrity (hash mismatch, data loss), 9 local file error."
)]
struct Cli {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Print retries, upload ids and acknowledgements on stderr.
    #[arg(short, long, global = true)]
    verbose: bool,

    /// Print nothing on stderr except errors (no progress bars, no retry notes).
    #[arg(short, long, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Upload FILE (`-` for stdin) as KEY (default: the file name; for stdin, the content hash).
    Put {
        /// The file to upload, or `-` for standard input.
        file: String,
        /// The key to store it under.
        key: Option<String>,
        /// Upload through the resumable UploadService: a put interrupted (even killed) resumes
        /// from the last acknowledged byte when run again with the same FILE. Prints the blob
        /// key; with KEY the file record is then created from the stored blob.
        #[arg(long)]
        resumable: bool,
        /// Human-readable name (default: the key's last segment).
        #[arg(long)]
        name: Option<String>,
        /// MIME type (default application/octet-stream).
        #[arg(long)]
        content_type: Option<String>,
        /// Metadata entry NAME=VALUE (repeatable).
        #[arg(long = "meta", value_name = "NAME=VALUE")]
        meta: Vec<String>,
        /// Send at most this many bytes per second (e.g. 10M).
        #[arg(long, value_name = "BYTES", value_parser = parse_size)]
        limit_rate: Option<u64>,
        /// Print the stored file as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download KEY into FILE (default `-`, standard output).
    Get {
        /// The file's key.
        key: String,
        /// Where to write; `-` for standard output. A file is written in full or not at all.
        file: Option<String>,
    },
    /// List files whose key starts with PREFIX.
    Ls {
        /// Key prefix; empty lists everything.
        prefix: Option<String>,
        /// Print JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
        /// At most this many files (0: no limit).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
    /// Describe one file.
    Stat {
        /// The file's key.
        key: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete one file.
    Rm {
        /// The file's key.
        key: String,
    },
    /// Read or change a file's metadata.
    Meta {
        #[command(subcommand)]
        command: MetaCommand,
    },
    /// Content-addressed blobs (Graviton BlobService).
    Blob {
        #[command(subcommand)]
        command: BlobCommand,
    },
    /// The membership view of blob pods.
    Peers {
        #[command(subcommand)]
        command: PeersCommand,
    },
    /// Live events.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// API keys (AuthService; needs scope `admin`).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Health of the server process and each service it hosts (exit 0 only when healthy).
    Health {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Version, role, uptime, storage and request figures of the server process.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure upload, download, small-object and event fan-out performance (JSON on stdout),
    /// with this machine's limits measured alongside.
    Bench(bench::BenchArgs),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum MetaCommand {
    /// Set metadata entries (merged into the existing ones unless --replace).
    Set {
        /// The file's key.
        key: String,
        /// Entries NAME=VALUE.
        #[arg(value_name = "NAME=VALUE")]
        entries: Vec<String>,
        /// Make the metadata exactly the given entries.
        #[arg(long)]
        replace: bool,
        /// Remove this entry (repeatable).
        #[arg(long, value_name = "NAME")]
        remove: Vec<String>,
    },
    /// Print a file's metadata (one NAME=VALUE per line, or JSON).
    Get {
        /// The file's key.
        key: String,
        /// Only this entry's value.
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BlobCommand {
    /// Download a blob, or a byte range of it, into FILE (default standard output).
    Get {
        /// The blob key (64 hex characters).
        key: String,
        /// Where to write; `-` for standard output.
        file: Option<String>,
        /// Byte range START-END (END exclusive; `START-` to the end).
        #[arg(long, value_name = "START-END")]
        range: Option<String>,
    },
    /// Describe a blob.
    Stat {
        /// The blob key (64 hex characters).
        key: String,
    },
}

#[derive(Subcommand)]
enum PeersCommand {
    /// List peers.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a peer outside discovery.
    Add {
        /// HOST:PORT of the peer's gRPC endpoint.
        address: String,
        /// Stable id (default HOST:PORT).
        #[arg(long)]
        id: Option<String>,
        /// Metadata entry NAME=VALUE (repeatable; `zone` and `node` fill those fields).
        #[arg(long = "meta", value_name = "NAME=VALUE")]
        meta: Vec<String>,
    },
    /// Remove a peer (its data is moved off).
    Rm {
        /// The peer's id.
        id: String,
    },
    /// A peer's latest health check.
    Health {
        /// The peer's id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print its secret (shown only once) on stdout.
    Create {
        /// Unique name of the key.
        name: String,
        /// Scope: read, write, admin (repeatable; default read and write).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Restrict the key to file keys starting with this prefix.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Lifetime, e.g. 30d (default: never expires).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// List keys (never their secrets).
    Ls {
        /// Include revoked keys.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id.
    Revoke {
        /// The key's id.
        id: String,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Print events as they happen, one line each (or one JSON object per line), until
    /// interrupted.
    Watch {
        /// Topic: file_operations, peer_network, system, alerts (repeatable; default all).
        #[arg(long = "topic")]
        topics: Vec<String>,
        /// Event type, e.g. file_uploaded (repeatable; default all).
        #[arg(long = "type")]
        types: Vec<String>,
        /// Replay buffered events after this sequence number first.
        #[arg(long)]
        since: Option<u64>,
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
        /// Stop after this many events (0: never).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
}

/// A failure with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

fn classify(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(ce) = cause.downcast_ref::<peervault_client::Error>() {
            return match ce.kind() {
                ErrorKind::Config => exit::USAGE,
                ErrorKind::NotFound => exit::NOT_FOUND,
                ErrorKind::Auth => exit::AUTH,
                ErrorKind::Unavailable => exit::UNAVAILABLE,
                ErrorKind::Rejected => exit::REJECTED,
                ErrorKind::Quota => exit::QUOTA,
                ErrorKind::Integrity => exit::INTEGRITY,
                ErrorKind::Io => exit::IO,
                ErrorKind::Other => exit::GENERIC,
            };
        }
        if let Some(u) = cause.downcast_ref::<UsageError>() {
            let _ = u;
            return exit::USAGE;
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return exit::IO;
        }
    }
    exit::GENERIC
}

/// A usage or configuration mistake (exit 2).
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pvault: error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::GENERIC);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            // One line: what went wrong and what to do.
            let line = f.message.replace('\n', " ");
            eprintln!("pvault: error: {line}");
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    let to_failure = |e: anyhow::Error| Failure {
        code: classify(&e),
        message: format!("{e:#}"),
    };
    if let Command::Completions { shell } = &cli.command {
        let mut cmd = Cli::command();
        clap_complete::generate(*shell, &mut cmd, "pvault", &mut std::io::stdout());
        return Ok(0);
    }
    let ui = Ui {
        verbose: cli.verbose && !cli.quiet,
        quiet: cli.quiet,
        bars: !cli.quiet && std::io::stderr().is_terminal(),
    };
    let settings = config::Settings::resolve(&cli.connect).map_err(to_failure)?;
    let client = settings.client(&ui).map_err(to_failure)?;
    dispatch(cli.command, &client, &settings, &ui).await.map_err(to_failure)
}

/// How much to say on stderr.
#[derive(Clone, Copy)]
pub(crate) struct Ui {
    pub verbose: bool,
    pub quiet: bool,
    pub bars: bool,
}

impl Ui {
    fn bar(&self, total: Option<u64>, what: &str) -> Option<ProgressBar> {
        if !self.bars {
            return None;
        }
        let bar = match total {
            Some(t) => ProgressBar::new(t).with_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{msg} {spinner} {bytes} {binary_bytes_per_sec}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Some(bar)
    }

    fn note(&self, msg: &str) {
        if self.verbose {
            eprintln!("pvault: {msg}");
        }
    }
}

fn progress_of(bar: &Option<ProgressBar>) -> Option<Progress> {
    bar.clone()
        .map(|b| Arc::new(move |n: u64| b.set_position(n)) as Progress)
}

fn parse_kv(entries: &[String]) -> anyhow::Result<HashMap<String, String>> {
    entries
        .iter()
        .map(|e| {
            e.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| usage(format!("'{e}' is not NAME=VALUE")))
        })
        .collect()
}

/// Parses `1048576`, `64K`, `10M`, `1G` (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1024,
                'M' => 1024 * 1024,
                'G' => 1024 * 1024 * 1024,
                _ => return Err(format!("unknown unit '{c}' (use K, M or G)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|e| format!("'{s}' is not a size: {e}"))
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    match t {
        Some(t) if t.seconds > 0 => {
            let st = UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos.max(0) as u32);
            humantime::format_rfc3339_seconds(st).to_string()
        }
        _ => String::new(),
    }
}

fn file_json(f: &FileResponse) -> Value {
    json!({
        "key": f.key,
        "name": f.name,
        "size": f.size,
        "content_type": f.content_type,
        "hash": f.hash,
        "created_at": ts(&f.created_at),
        "updated_at": ts(&f.updated_at),
        "metadata": f.metadata,
        "replicas": f.replicas.iter().map(|r| json!({"peer_id": r.peer_id, "status": r.status, "address": r.address})).collect::<Vec<_>>(),
    })
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A reader that delivers at most `rate` bytes per second (for `--limit-rate`).
fn throttle<R: AsyncRead + Unpin + Send + 'static>(mut reader: R, rate: u64) -> tokio::io::DuplexStream {
    let (mut w, r) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let start = tokio::time::Instant::now();
        let mut sent = 0u64;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if w.write_all(&buf[..n]).await.is_err() {
                break;
            }
            sent += n as u64;
            let due = start + Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
            tokio::time::sleep_until(due).await;
        }
    });
    r
}

async fn dispatch(command: Command, client: &Client, settings: &config::Settings, ui: &Ui) -> anyhow::Result<u8> {
    match command {
        Command::Put {
            file,
            key,
            resumable,
            name,
            content_type,
            meta,
            limit_rate,
            json,
        } => {
            let metadata = parse_kv(&meta)?;
            if resumable {
                return put_resumable(
                    client,
                    settings,
                    ui,
                    &file,
                    key,
                    name,
                    content_type,
                    metadata,
                    limit_rate,
                    json,
                )
                .await;
            }
            let opts_base = PutOptions {
                name,
                content_type,
                metadata,
                ..Default::default()
            };
            let f = if file == "-" {
                let key = key.unwrap_or_default();
                let bar = ui.bar(None, "put");
                let opts = PutOptions {
                    progress: progress_of(&bar),
                    ..opts_base
                };
                let stdin = tokio::io::stdin();
                let r = match limit_rate {
                    Some(rate) => client.put_file(&key, throttle(stdin, rate), opts).await,
                    None => {
                        client
                            .put_file(&key, tokio::io::BufReader::with_capacity(256 * 1024, stdin), opts)
                            .await
                    }
                };
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                r?
            } else {
                let path = PathBuf::from(&file);
                let meta = std::fs::metadata(&path).with_context(|| format!("cannot read {file}"))?;
                if !meta.is_file() {
                    return Err(usage(format!("{file} is not a regular file")));
                }
                let key = match key {
                    Some(k) => k,
                    None => default_key(&path)?,
                };
                let bar = ui.bar(Some(meta.len()), &key);
                let opts = PutOptions {
                    progress: progress_of(&bar),
                    ..opts_base
                };
                let r = match limit_rate {
                    Some(rate) => {
                        let f = tokio::fs::File::open(&path)
                            .await
                            .with_context(|| format!("cannot open {file}"))?;
                        client.put_file(&key, throttle(f, rate), opts).await
                    }
                    None => client.put_path(&key, &path, opts).await,
                };
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                r?
            };
            if json {
                print_json(&file_json(&f));
            } else {
                println!("{}\t{}\t{}", f.key, f.size, f.hash);
            }
            Ok(0)
        }
        Command::Get { key, file } => {
            let target = file.unwrap_or_else(|| "-".into());
            let bar = match client.stat(&key).await {
                Ok(info) => ui.bar(Some(info.size as u64), &key),
                Err(e) => return Err(e.into()),
            };
            let progress = progress_of(&bar);
            let r = write_output(&target, |w| async { client.get_file(&key, w, progress).await }).await;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let d = r?;
            ui.note(&format!(
                "{} bytes, blake3 {}, {} reconnection(s)",
                d.bytes, d.hash, d.reconnects
            ));
            Ok(0)
        }
        Command::Ls { prefix, json, limit } => {
            let files = client.list(prefix.as_deref().unwrap_or(""), limit).await?;
            if json {
                print_json(&Value::Array(files.iter().map(file_json).collect()));
            } else {
                let w = files.iter().map(|f| f.key.len()).max().unwrap_or(3).max(3);
                println!("{:<w$}  {:>12}  {:<20}  HASH", "KEY", "SIZE", "UPDATED");
                for f in &files {
                    println!(
                        "{:<w$}  {:>12}  {:<20}  {}",
                        f.key,
                        f.size,
                        ts(&f.updated_at),
                        f.hash.get(..12).unwrap_or(&f.hash)
                    );
                }
            }
            Ok(0)
        }
        Command::Stat { key, json } => {
            let f = client.stat(&key).await?;
            if json {
                print_json(&file_json(&f));
            } else {
                println!("key:          {}", f.key);
                println!("name:         {}", f.name);
                println!("size:         {}", f.size);
                println!("content type: {}", f.content_type);
                println!("hash:         {}", f.hash);
                println!("created:      {}", ts(&f.created_at));
                println!("updated:      {}", ts(&f.updated_at));
                let mut m: Vec<_> = f.metadata.iter().collect();
                m.sort();
                for (k, v) in m {
                    println!("meta:         {k}={v}");
                }
                for r in &f.replicas {
                    println!("replica:      {} {} {}", r.peer_id, r.status, r.address);
                }
            }
            Ok(0)
        }
        Command::Rm { key } => {
            let r = client.delete(&key).await?;
            ui.note(&r.message);
            Ok(0)
        }
        Command::Meta { command } => match command {
            MetaCommand::Set {
                key,
                entries,
                replace,
                remove,
            } => {
                let set = parse_kv(&entries)?;
                if set.is_empty() && remove.is_empty() && !replace {
                    return Err(usage("nothing to change: give NAME=VALUE entries or --remove NAME"));
                }
                client.update_metadata(&key, set, remove, replace).await?;
                Ok(0)
            }
            MetaCommand::Get { key, name, json } => {
                let f = client.stat(&key).await?;
                if let Some(n) = name {
                    match f.metadata.get(&n) {
                        Some(v) => println!("{v}"),
                        None => return Err(anyhow!(peervault_client::Error::Status(tonic_not_found(&key, &n)))),
                    }
                } else if json {
                    print_json(&json!(f.metadata));
                } else {
                    let mut m: Vec<_> = f.metadata.iter().collect();
                    m.sort();
                    for (k, v) in m {
                        println!("{k}={v}");
                    }
                }
                Ok(0)
            }
        },
        Command::Blob { command } => match command {
            BlobCommand::Get { key, file, range } => {
                let range = range.as_deref().map(parse_range).transpose()?;
                let target = file.unwrap_or_else(|| "-".into());
                let d = write_output(&target, |w| async {
                    client.get_blob(key.as_bytes(), range, w, None).await
                })
                .await?;
                ui.note(&format!("{} bytes", d.bytes));
                Ok(0)
            }
            BlobCommand::Stat { key } => {
                let b = client.stat_blob(key.as_bytes()).await?;
                print_json(&json!({
                    "key": hex(&b.key),
                    "size": b.size,
                    "content_type": b.content_type,
                    "attributes": b.attributes,
                    "created_at": ts(&b.created_at),
                }));
                Ok(0)
            }
        },
        Command::Peers { command } => peers(client, command).await,
        Command::Events {
            command:
                EventsCommand::Watch {
                    topics,
                    types,
                    since,
                    json,
                    count,
                },
        } => {
            let mut watch = client
                .watch_events(EventFilter {
                    topics: topics.clone(),
                    types,
                    since,
                    source: String::new(),
                })
                .await?;
            if !ui.quiet {
                let what = if topics.is_empty() {
                    "all topics".to_string()
                } else {
                    topics.join(",")
                };
                eprintln!("pvault: watching {what} on {}", client.server());
            }
            let mut seen = 0u64;
            while let Some(ev) = watch.next().await? {
                if json {
                    println!("{}", event_json(&ev));
                } else {
                    println!("{}", event_line(&ev));
                }
                seen += 1;
                if count > 0 && seen >= count {
                    break;
                }
            }
            Ok(0)
        }
        Command::Health { json } => {
            let h = client.health().await?;
            if json {
                print_json(&json!({"status": h.status, "version": h.version, "services": h.services}));
            } else {
                println!("{} (version {})", h.status, h.version);
                let mut s: Vec<_> = h.services.iter().collect();
                s.sort();
                for (k, v) in s {
                    println!("  {k}: {v}");
                }
            }
            Ok(if h.status == "healthy" || h.status == "SERVING" {
                0
            } else {
                exit::UNAVAILABLE
            })
        }
        Command::Info { json } => {
            let i = client.system_info().await?;
            let m = client.metrics().await?;
            if json {
                print_json(&json!({
                    "version": i.version, "role": i.role, "node_id": i.node_id,
                    "uptime_seconds": i.uptime_seconds, "start_time": ts(&i.start_time),
                    "storage_used": i.storage_used, "storage_total": i.storage_total,
                    "peer_count": i.peer_count, "file_count": i.file_count,
                    "requests_total": m.requests_total, "requests_per_minute": m.requests_per_minute,
                    "active_connections": m.active_connections, "storage_usage_percent": m.storage_usage_percent,
                }));
            } else {
                println!("server:       {}", client.server());
                println!("version:      {}", i.version);
                println!("role:         {}", i.role);
                println!("node:         {}", i.node_id);
                println!("uptime:       {}s", i.uptime_seconds);
                println!(
                    "storage:      {} of {} bytes ({:.1}%)",
                    i.storage_used, i.storage_total, m.storage_usage_percent
                );
                println!("files:        {}", i.file_count);
                println!("peers:        {}", i.peer_count);
                println!("requests:     {} ({:.1}/min)", m.requests_total, m.requests_per_minute);
                println!("connections:  {}", m.active_connections);
            }
            Ok(0)
        }
        Command::Keys { command } => keys(client, command).await,
        Command::Bench(args) => bench::run(client, args, ui).await,
        Command::Completions { .. } => Ok(0),
    }
}

fn tonic_not_found(key: &str, name: &str) -> peervault_client::tonic::Status {
    peervault_client::tonic::Status::not_found(format!("file '{key}' has no metadata entry '{name}'"))
}

fn default_key(path: &Path) -> anyhow::Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| usage(format!("cannot derive a key from {}; give KEY", path.display())))
}

fn parse_range(s: &str) -> anyhow::Result<(u64, Option<u64>)> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| usage(format!("--range '{s}' is not START-END or START-")))?;
    let start = a
        .trim()
        .parse::<u64>()
        .map_err(|e| usage(format!("--range start '{a}': {e}")))?;
    let end = if b.trim().is_empty() {
        None
    } else {
        Some(
            b.trim()
                .parse::<u64>()
                .map_err(|e| usage(format!("--range end '{b}': {e}")))?,
        )
    };
    if end.is_some_and(|e| e < start) {
        return Err(usage(format!("--range '{s}': the end is before the start")));
    }
    Ok((start, end))
}

/// Runs `f` with a writer for `target` (`-` is stdout). A file is written to a temporary name
/// beside it and renamed into place only on success.
async fn write_output<F, Fut>(target: &str, f: F) -> anyhow::Result<peervault_client::Download>
where
    F: FnOnce(Box<dyn tokio::io::AsyncWrite + Unpin + Send>) -> Fut,
    Fut: std::future::Future<Output = Result<peervault_client::Download, peervault_client::Error>>,
{
    if target == "-" {
        let out = tokio::io::BufWriter::with_capacity(256 * 1024, tokio::io::stdout());
        return Ok(f(Box::new(out)).await?);
    }
    let path = PathBuf::from(target);
    let tmp = path.with_file_name(format!(
        ".{}.pvault-partial",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("download")
    ));
    let file = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let out = tokio::io::BufWriter::with_capacity(256 * 1024, file);
    match f(Box::new(out)).await {
        Ok(d) => {
            tokio::fs::rename(&tmp, &path)
                .await
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
            Ok(d)
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e.into())
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn put_resumable(
    client: &Client,
    settings: &config::Settings,
    ui: &Ui,
    file: &str,
    key: Option<String>,
    name: Option<String>,
    content_type: Option<String>,
    metadata: HashMap<String, String>,
    limit_rate: Option<u64>,
    json: bool,
) -> anyhow::Result<u8> {
    let mut attributes = metadata.clone();
    if let Some(ct) = &content_type {
        attributes.insert("content-type".into(), ct.clone());
    }
    let (reader, total, identity): (Box<dyn AsyncRead + Unpin + Send>, Option<u64>, Option<state::Identity>) =
        if file == "-" {
            (Box::new(tokio::io::stdin()), None, None)
        } else {
            let path = PathBuf::from(file);
            let id = state::Identity::of(&path, client.server())?;
            let f = tokio::fs::File::open(&path)
                .await
                .with_context(|| format!("cannot open {file}"))?;
            (Box::new(f), Some(id.size), Some(id))
        };
    let reader: Box<dyn AsyncRead + Unpin + Send> = match limit_rate {
        Some(rate) => Box::new(throttle(reader, rate)),
        None => Box::new(tokio::io::BufReader::with_capacity(256 * 1024, reader)),
    };
    let store = state::Store::new(settings.state_dir.clone());
    let resume_id = identity.as_ref().and_then(|i| store.find(i));
    if let Some(id) = &resume_id
        && !ui.quiet
    {
        eprintln!("pvault: resuming upload {id} of {file}");
    }
    let bar = ui.bar(total, key.as_deref().unwrap_or(file));
    let bar_progress = progress_of(&bar);
    let verbose = ui.verbose;
    let last_note = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let progress: Progress = Arc::new(move |n: u64| {
        if let Some(p) = &bar_progress {
            p(n);
        }
        if verbose && n > last_note.swap(n, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("pvault: {n} bytes acknowledged");
        }
    });
    let store2 = store.clone();
    let identity2 = identity.clone();
    let on_id: Arc<dyn Fn(&str) + Send + Sync> = Arc::new(move |id: &str| {
        if verbose {
            eprintln!("pvault: upload id {id}");
        }
        if let Some(i) = &identity2
            && let Err(e) = store2.save(i, id)
        {
            eprintln!(
                "pvault: warning: cannot save the upload state ({e:#}); this upload cannot be resumed by a later run"
            );
        }
    });
    let opts = UploadOptions {
        total_size: total,
        attributes,
        resume_id,
        progress: Some(progress),
        on_upload_id: Some(on_id),
        ..Default::default()
    };
    let r = client.upload_blob(reader, opts).await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let up = r?;
    if let Some(i) = &identity {
        store.remove(i);
    }
    let blob = hex(&up.key);
    ui.note(&format!(
        "blob {blob}: {} bytes, resumed from byte {}, {} reconnection(s)",
        up.size, up.resumed_from, up.reconnects
    ));
    let Some(key) = key else {
        if json {
            print_json(&json!({"blob": blob, "size": up.size, "resumed_from": up.resumed_from}));
        } else {
            println!("{blob}\t{}", up.size);
        }
        return Ok(0);
    };
    // No RPC points a file key at an existing blob yet: stream the stored blob back into a
    // file upload (the server deduplicates, so nothing is stored twice; the expected hash
    // guarantees the file is exactly the blob).
    let (w, r) = tokio::io::duplex(1024 * 1024);
    let opts = PutOptions {
        name,
        content_type,
        metadata,
        expected_hash: Some(blob.clone()),
        ..Default::default()
    };
    let (got, put) = tokio::join!(client.get_blob(&up.key, None, w, None), client.put_file(&key, r, opts));
    got?;
    let f = put?;
    if json {
        print_json(&file_json(&f));
    } else {
        println!("{}\t{}\t{}", f.key, f.size, f.hash);
    }
    Ok(0)
}

async fn peers(client: &Client, command: PeersCommand) -> anyhow::Result<u8> {
    match command {
        PeersCommand::Ls { json } => {
            let l = client.list_peers().await?;
            if json {
                print_json(&Value::Array(
                    l.peers
                        .iter()
                        .map(|p| {
                            json!({"id": p.id, "address": p.address, "port": p.port, "status": p.status,
                                "ready": p.ready, "zone": p.zone, "last_seen": ts(&p.last_seen), "metadata": p.metadata})
                        })
                        .collect(),
                ));
            } else {
                let w = l.peers.iter().map(|p| p.id.len()).max().unwrap_or(2).max(2);
                println!("{:<w$}  {:<24}  {:<9}  READY", "ID", "ADDRESS", "STATUS");
                for p in &l.peers {
                    println!(
                        "{:<w$}  {:<24}  {:<9}  {}",
                        p.id,
                        format!("{}:{}", p.address, p.port),
                        p.status,
                        p.ready
                    );
                }
            }
            Ok(0)
        }
        PeersCommand::Add { address, id, meta } => {
            let p = client
                .add_peer(&address, 0, id.as_deref().unwrap_or(""), parse_kv(&meta)?)
                .await?;
            println!("{}\t{}:{}\t{}", p.id, p.address, p.port, p.status);
            Ok(0)
        }
        PeersCommand::Rm { id } => {
            let r = client.remove_peer(&id).await?;
            println!("{}", r.message);
            Ok(0)
        }
        PeersCommand::Health { id, json } => {
            let h = client.peer_health(&id).await?;
            if json {
                print_json(
                    &json!({"peer_id": h.peer_id, "status": h.status, "latency_ms": h.latency_ms,
                    "uptime_seconds": h.uptime_seconds, "consecutive_failures": h.consecutive_failures,
                    "last_check": ts(&h.last_check), "metrics": h.metrics}),
                );
            } else {
                println!(
                    "{} {} latency {:.2} ms, up {} s, {} consecutive failure(s)",
                    h.peer_id, h.status, h.latency_ms, h.uptime_seconds, h.consecutive_failures
                );
            }
            Ok(0)
        }
    }
}

async fn keys(client: &Client, command: KeysCommand) -> anyhow::Result<u8> {
    match command {
        KeysCommand::Create {
            name,
            scopes,
            prefix,
            ttl,
        } => {
            let scopes = if scopes.is_empty() {
                vec!["read".to_string(), "write".to_string()]
            } else {
                scopes
            };
            let r = client.create_api_key(&name, scopes, &prefix, ttl).await?;
            println!("{}", r.secret);
            Ok(0)
        }
        KeysCommand::Ls { all, json } => {
            let keys = client.list_api_keys(all).await?;
            if json {
                print_json(&Value::Array(
                    keys.iter()
                        .map(|k| {
                            json!({"id": k.id, "name": k.name, "scopes": k.scopes, "key_prefix": k.key_prefix,
                                "created_at": ts(&k.created_at), "expires_at": ts(&k.expires_at), "revoked": k.revoked,
                                "created_by": k.created_by})
                        })
                        .collect(),
                ));
            } else {
                for k in &keys {
                    let state = if k.revoked { " (revoked)" } else { "" };
                    println!("{}\t{}\t{}\t{}{state}", k.id, k.name, k.scopes.join(","), k.key_prefix);
                }
            }
            Ok(0)
        }
        KeysCommand::Revoke { id } => {
            client.revoke_api_key(&id).await?;
            Ok(0)
        }
    }
}

fn event_summary(ev: &Event) -> String {
    match &ev.payload {
        Some(Payload::FileOperation(f)) => format!("key={} size={} peer={}", f.file_key, f.size, f.peer_id),
        Some(Payload::Peer(p)) => {
            let mut m: Vec<_> = p.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
            m.sort();
            format!("peer={} {}", p.peer_id, m.join(" "))
        }
        Some(Payload::System(s)) => format!("{} {}", s.component, s.message),
        Some(Payload::Alert(a)) => format!("{} {}={} (threshold {})", a.level, a.metric, a.value, a.threshold),
        Some(Payload::Lagged(l)) => format!("missed {} events (reading too slowly)", l.missed),
        Some(Payload::ReplayStart(r)) => format!("replay starts at sequence {}", r.first_available_sequence),
        None => ev.data_json.clone(),
    }
}

fn event_line(ev: &Event) -> String {
    format!(
        "{} #{} {}/{} {} {}",
        ts(&ev.timestamp),
        ev.sequence,
        ev.topic,
        ev.r#type,
        ev.source,
        event_summary(ev)
    )
}

fn event_json(ev: &Event) -> String {
    let data: Value = serde_json::from_str(&ev.data_json).unwrap_or(Value::Null);
    json!({
        "id": ev.id,
        "sequence": ev.sequence,
        "node": ev.node,
        "topic": ev.topic,
        "type": ev.r#type,
        "timestamp": ts(&ev.timestamp),
        "source": ev.source,
        "data": data,
        "summary": event_summary(ev),
    })
    .to_string()
}

/// Seconds since the epoch (for bench key names).
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ranges_parse() {
        assert_eq!(parse_size("10M").unwrap(), 10 * 1024 * 1024);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("1X").is_err());
        assert_eq!(parse_range("10-20").unwrap(), (10, Some(20)));
        assert_eq!(parse_range("10-").unwrap(), (10, None));
        assert!(parse_range("20-10").is_err());
        assert!(parse_range("x").is_err());
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
