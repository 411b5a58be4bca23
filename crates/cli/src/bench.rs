//! `pvault bench`: upload, download, small-object and event fan-out figures against a running
//! server, printed as JSON beside this machine's limits measured in the same run (loopback
//! TCP and TLS throughput, disk write with fsync, BLAKE3 hashing).

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use clap::Args;
use peervault_client::{Client, EventFilter, PutOptions, proto::event::Payload};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

use crate::Ui;

/// Options of `pvault bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Size of the large upload/download, in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Number of small objects.
    #[arg(long, default_value_t = 500)]
    small_count: usize,
    /// Size of each small object, in bytes.
    #[arg(long, default_value_t = 4096)]
    small_size: usize,
    /// Concurrent small-object uploads.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Event subscribers for the fan-out measurement (0 skips it).
    #[arg(long, default_value_t = 4)]
    subscribers: usize,
    /// Uploads observed by every subscriber in the fan-out measurement.
    #[arg(long, default_value_t = 100)]
    events: usize,
    /// Folder for the disk-write measurement (default: the system temporary folder).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Keep the objects written (default: delete them afterwards).
    #[arg(long)]
    keep: bool,
}

/// A reader of `len` pseudo-random bytes generated on the fly (no memory held).
struct Generated {
    left: u64,
    x: u64,
}

impl AsyncRead for Generated {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left) as usize;
        let mut out = vec![0u8; n];
        for b in out.chunks_mut(8) {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            let v = self.x.to_le_bytes();
            b.copy_from_slice(&v[..b.len()]);
        }
        buf.put_slice(&out);
        self.left -= n as u64;
        Poll::Ready(Ok(()))
    }
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    (bytes as f64 / (1024.0 * 1024.0)) / d.as_secs_f64().max(1e-9)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

async fn loopback_tcp(bytes: u64) -> anyhow::Result<f64> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0u64;
        loop {
            let r = s.read(&mut buf).await?;
            if r == 0 {
                return Ok::<u64, std::io::Error>(n);
            }
            n += r as u64;
        }
    });
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    let buf = vec![7u8; 256 * 1024];
    let t = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        c.write_all(&buf).await?;
        sent += buf.len() as u64;
    }
    c.shutdown().await?;
    drop(c);
    server.await??;
    Ok(mib_s(sent, t.elapsed()))
}

/// Throughput of one TLS 1.3 connection over loopback (rustls, ring; a self-signed certificate
/// made for the run): the ceiling for one gRPC stream.
async fn loopback_tls(bytes: u64) -> anyhow::Result<f64> {
    use std::sync::Arc;

    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let mut server_cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    // No session tickets: the client never reads, and unread tickets would make closing the
    // socket reset the connection before the server has read everything.
    server_cfg.send_tls13_tickets = 0;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let client_cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await?;
        let mut s = acceptor.accept(s).await?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0u64;
        loop {
            let r = s.read(&mut buf).await?;
            if r == 0 {
                return Ok::<u64, std::io::Error>(n);
            }
            n += r as u64;
        }
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut c = connector.connect(ServerName::try_from("localhost")?, tcp).await?;
    let buf = vec![7u8; 256 * 1024];
    let t = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        c.write_all(&buf).await?;
        sent += buf.len() as u64;
    }
    c.shutdown().await?;
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest).await;
    server.await??;
    Ok(mib_s(sent, t.elapsed()))
}

fn disk_write(dir: &std::path::Path, bytes: u64) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join(format!(".pvault-bench-{}", std::process::id()));
    let buf = vec![3u8; 1024 * 1024];
    let t = Instant::now();
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&path)?;
        let mut n = 0;
        while n < bytes {
            f.write_all(&buf)?;
            n += buf.len() as u64;
        }
        f.sync_all()
    })();
    let d = t.elapsed();
    let _ = std::fs::remove_file(&path);
    r?;
    Ok(mib_s(bytes, d))
}

fn hash_rate(bytes: u64) -> f64 {
    let buf = vec![5u8; 1024 * 1024];
    let mut h = blake3::Hasher::new();
    let t = Instant::now();
    let mut n = 0;
    while n < bytes {
        h.update(&buf);
        n += buf.len() as u64;
    }
    let _ = h.finalize();
    mib_s(bytes, t.elapsed())
}

/// Runs the benchmark and prints one JSON document.
pub async fn run(client: &Client, args: BenchArgs, ui: &Ui) -> anyhow::Result<u8> {
    let prefix = format!("bench/{}-{}/", std::process::id(), crate::now_secs());
    let note = |m: &str| {
        if !ui.quiet {
            eprintln!("pvault bench: {m}");
        }
    };
    client.system_info().await?;
    let big = args.size_mib * 1024 * 1024;

    note("machine limits");
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let limits = json!({
        "loopback_tcp_mib_s": round(loopback_tcp(big.max(256 << 20)).await?),
        "loopback_tls_mib_s": round(loopback_tls(big.max(256 << 20)).await?),
        "disk_write_fsync_mib_s": round(disk_write(&dir, big.min(512 << 20))?),
        "blake3_hash_mib_s": round(hash_rate(big.max(256 << 20))),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });

    note(&format!("upload {} MiB", args.size_mib));
    let key = format!("{prefix}large");
    let t = Instant::now();
    client
        .put_file(
            &key,
            Generated {
                left: big,
                x: 0x9E37_79B9_7F4A_7C15,
            },
            PutOptions::default(),
        )
        .await?;
    let up = t.elapsed();

    note(&format!("download {} MiB", args.size_mib));
    let t = Instant::now();
    client.get_file(&key, tokio::io::sink(), None).await?;
    let down = t.elapsed();

    note(&format!(
        "{} small objects of {} bytes",
        args.small_count, args.small_size
    ));
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.small_count {
        let c = client.clone();
        let sem = sem.clone();
        let k = format!("{prefix}small/{i:06}");
        // Distinct content per object, so deduplication does not flatter the figures.
        let mut data = vec![(i % 251) as u8; args.small_size.max(8)];
        data[..8].copy_from_slice(&(i as u64 ^ crate::now_secs() << 20).to_le_bytes());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await;
            let t = Instant::now();
            c.put_file(&k, &data[..], PutOptions::default())
                .await
                .map(|_| t.elapsed())
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.push(t.await??.as_secs_f64() * 1000.0);
    }
    let small_total = t.elapsed();
    lat.sort_by(|a, b| a.total_cmp(b));
    let t = Instant::now();
    let mut get_lat = Vec::new();
    for i in 0..args.small_count.min(200) {
        let t = Instant::now();
        client
            .get_file(&format!("{prefix}small/{i:06}"), tokio::io::sink(), None)
            .await?;
        get_lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let gets = t.elapsed();
    get_lat.sort_by(|a, b| a.total_cmp(b));

    let fanout = if args.subscribers > 0 {
        note(&format!("event fan-out to {} subscribers", args.subscribers));
        Some(fanout(client, &prefix, args.subscribers, args.events).await?)
    } else {
        None
    };

    let out = json!({
        "server": client.server(),
        "machine_limits": limits,
        "upload": {"bytes": big, "seconds": round(up.as_secs_f64()), "mib_s": round(mib_s(big, up))},
        "download": {"bytes": big, "seconds": round(down.as_secs_f64()), "mib_s": round(mib_s(big, down))},
        "small_objects": {
            "count": args.small_count, "size": args.small_size, "concurrency": args.concurrency,
            "put_ops_s": round(args.small_count as f64 / small_total.as_secs_f64().max(1e-9)),
            "put_p50_ms": round(pct(&lat, 0.5)), "put_p99_ms": round(pct(&lat, 0.99)),
            "get_sequential_ops_s": round(get_lat.len() as f64 / gets.as_secs_f64().max(1e-9)),
            "get_p50_ms": round(pct(&get_lat, 0.5)), "get_p99_ms": round(pct(&get_lat, 0.99)),
        },
        "event_fanout": fanout.unwrap_or(Value::Null),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);

    if !args.keep {
        note("cleaning up");
        let _ = client.delete(&key).await;
        for f in client.list(&prefix, 0).await.unwrap_or_default() {
            let _ = client.delete(&f.key).await;
        }
    }
    Ok(0)
}

async fn fanout(client: &Client, prefix: &str, subscribers: usize, events: usize) -> anyhow::Result<Value> {
    let ev_prefix = format!("{prefix}events/");
    let mut handles = Vec::new();
    for _ in 0..subscribers {
        let mut w = client
            .watch_events(EventFilter {
                topics: vec!["file_operations".into()],
                types: vec!["file_uploaded".into()],
                ..Default::default()
            })
            .await?;
        let p = ev_prefix.clone();
        handles.push(tokio::spawn(async move {
            let mut seen = 0;
            let mut last = Instant::now();
            while seen < events {
                match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
                    Ok(Ok(Some(ev))) => {
                        if let Some(Payload::FileOperation(f)) = &ev.payload
                            && f.file_key.starts_with(&p)
                        {
                            seen += 1;
                            last = Instant::now();
                        }
                    }
                    _ => break,
                }
            }
            (seen, last)
        }));
    }
    let t = Instant::now();
    for i in 0..events {
        client
            .put_file(&format!("{ev_prefix}{i:05}"), &b"event"[..], PutOptions::default())
            .await?;
    }
    let published = t.elapsed();
    let mut delivered = 0;
    let mut done = t;
    for h in handles {
        let (seen, last) = h.await?;
        delivered += seen;
        done = done.max(last);
    }
    let total = done.duration_since(t);
    Ok(json!({
        "subscribers": subscribers,
        "uploads": events,
        "delivered": delivered,
        "expected": subscribers * events,
        "upload_seconds": round(published.as_secs_f64()),
        "all_delivered_seconds": round(total.as_secs_f64()),
        "deliveries_per_s": round(delivered as f64 / total.as_secs_f64().max(1e-9)),
        "lag_after_last_upload_ms": round(total.saturating_sub(published).as_secs_f64() * 1000.0),
    }))
}
