//! Blob data-path benchmark (`cargo bench --bench blob`): 1 GiB single-stream upload and download
//! over mTLS on loopback, and 4 KiB puts/gets with 32 concurrent streams on one channel, each
//! printed beside this machine's limits measured in the same run (raw loopback TLS stream
//! throughput, raw sequential disk write with fsync, raw sequential read from a cold page cache).
//! The upload's limit is min(TLS, disk write), the download's min(TLS, disk read) — or TLS alone
//! when the page cache cannot be dropped (not root) and the download reads from memory.
//! Prints one JSON document.
//!
//! Sizes can be reduced for a quick look: `PV_BENCH_MIB=256 PV_BENCH_SMALL_OPS=2000`.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use peervault_proto::v1::{FileChunk, FileRequest, file_service_client::FileServiceClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const MIB: usize = 1024 * 1024;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// Fast deterministic pseudo-random fill (xorshift), so content never deduplicates.
fn fill(buf: &mut [u8], seed: &mut u64) {
    for c in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = seed.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

struct Server {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(dir: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_peervault"))
        .args(["serve", "all", "--data-dir"])
        .arg(dir)
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--log-format", "json", "--log", "warn,peervault_runtime=info"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start peervault");
    let out = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    let (grpc, admin) = loop {
        let line = lines.next().expect("server exited before ready").expect("read");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "peervault ready" {
            let addr = |k: &str| v[k].as_str().expect("address").parse().expect("addr");
            break (addr("grpc_addr"), addr("admin_addr"));
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Server {
        child,
        grpc,
        admin,
        dir: dir.to_path_buf(),
    }
}

/// (sum, count) of a histogram on the server's admin `/metrics` page, read over plain HTTP.
fn histogram(admin: SocketAddr, name: &str) -> (f64, f64) {
    use std::io::Read;
    let mut body = String::new();
    if let Ok(mut c) = std::net::TcpStream::connect(admin) {
        let _ = write!(c, "GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n");
        let _ = c.read_to_string(&mut body);
    }
    let value = |suffix: &str| {
        body.lines()
            .find(|l| l.starts_with(&format!("{name}_{suffix} ")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (value("sum"), value("count"))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used so far (`None`: this process), from
/// `/proc/<pid>/stat` in clock ticks of 1/100 s (Linux's USER_HZ on every supported arch).
fn cpu_secs(pid: Option<u32>) -> f64 {
    let path = pid.map_or_else(|| "/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// CPU used by the server and by this client (the load generator) between two points: the
/// phases are CPU-bound on small machines, and these show which side spends it.
struct CpuMeter {
    pid: u32,
    server: f64,
    client: f64,
}

impl CpuMeter {
    fn start(pid: u32) -> CpuMeter {
        CpuMeter {
            pid,
            server: cpu_secs(Some(pid)),
            client: cpu_secs(None),
        }
    }
    /// (server, client) CPU seconds since the start.
    fn stop(&self) -> (f64, f64) {
        (cpu_secs(Some(self.pid)) - self.server, cpu_secs(None) - self.client)
    }
}

/// Samples a process's RSS until stopped; returns the peak.
fn rss_sampler(pid: u32) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let mut peak = 0;
        while !s.load(Ordering::Relaxed) {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    });
    (stop, h)
}

async fn channel(server: &Server) -> Channel {
    let tls = server.dir.join("tls");
    let read = |f: &str| std::fs::read(tls.join(f)).expect("tls file");
    let cfg = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(read("ca.crt")))
        .identity(Identity::from_pem(read("client.crt"), read("client.key")));
    Endpoint::from_shared(format!("https://{}", server.grpc))
        .expect("uri")
        .initial_stream_window_size(Some(4 * MIB as u32))
        .initial_connection_window_size(Some(8 * MIB as u32))
        .tcp_nodelay(true)
        .tls_config(cfg)
        .expect("tls")
        .connect()
        .await
        .expect("connect")
}

/// Raw loopback TLS throughput with the same certificates and crypto provider: MB/s.
async fn loopback_tls_mbps(tls_dir: &Path, bytes: usize) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let files = peervault_runtime::tls::TlsFiles {
        cert: tls_dir.join("server.crt"),
        key: tls_dir.join("server.key"),
        client_ca: tls_dir.join("ca.crt"),
    };
    let server_cfg = peervault_runtime::tls::server_config(&files, peervault_runtime::config::ClientAuth::Required)
        .expect("server config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut s = acceptor.accept(tcp).await.expect("handshake");
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0usize;
        loop {
            let r = s.read(&mut buf).await.expect("read");
            if r == 0 {
                break;
            }
            n += r;
        }
        n
    });
    let mut roots = rustls::RootCertStore::empty();
    for c in peervault_runtime::tls::read_certs("ca", &tls_dir.join("ca.crt")).expect("ca") {
        roots.add(c).expect("root");
    }
    let certs = peervault_runtime::tls::read_certs("cert", &tls_dir.join("client.crt")).expect("cert");
    let key = peervault_runtime::tls::read_key("key", &tls_dir.join("client.key")).expect("key");
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .expect("client config");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let mut c = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(rustls::pki_types::ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let mut block = vec![0u8; 256 * 1024];
    let mut seed = 7u64;
    fill(&mut block, &mut seed);
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        c.write_all(&block).await.expect("write");
        sent += block.len();
    }
    c.shutdown().await.expect("shutdown");
    let got = srv.await.expect("server task");
    assert_eq!(got, sent);
    sent as f64 / 1e6 / start.elapsed().as_secs_f64()
}

/// Raw sequential disk write: (MB/s with one fsync at the end, MB/s with fdatasync per 1 MiB).
fn disk_write_mbps(dir: &Path, bytes: usize) -> (f64, f64) {
    let mut block = vec![0u8; MIB];
    let mut seed = 11u64;
    fill(&mut block, &mut seed);
    let path = dir.join("disk-bench.bin");
    let start = Instant::now();
    let mut f = std::fs::File::create(&path).expect("create");
    for _ in 0..bytes / MIB {
        f.write_all(&block).expect("write");
    }
    f.sync_all().expect("fsync");
    let once = bytes as f64 / 1e6 / start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    let start = Instant::now();
    let mut f = std::fs::File::create(&path).expect("create");
    for _ in 0..bytes / MIB {
        f.write_all(&block).expect("write");
        f.sync_data().expect("fdatasync");
    }
    let each = bytes as f64 / 1e6 / start.elapsed().as_secs_f64();
    drop(f);
    (once, each)
}

/// Drops the kernel's clean page cache (root only), so the next read comes from the disk.
/// Returns whether it could.
fn drop_page_cache() -> bool {
    let synced = Command::new("sync").status().map(|s| s.success()).unwrap_or(false);
    synced && std::fs::write("/proc/sys/vm/drop_caches", "1").is_ok()
}

/// Raw sequential read of the file `disk_write_mbps` left behind, 1 MiB at a time, from a cold
/// page cache when it can be dropped: (MB/s, whether the cache was cold). Removes the file.
fn disk_read_mbps(dir: &Path) -> (f64, bool) {
    use std::io::Read;
    let path = dir.join("disk-bench.bin");
    let cold = drop_page_cache();
    let mut f = std::fs::File::open(&path).expect("open");
    let mut buf = vec![0u8; MIB];
    let start = Instant::now();
    let mut n = 0usize;
    loop {
        let r = f.read(&mut buf).expect("read");
        if r == 0 {
            break;
        }
        n += r;
    }
    let mbps = n as f64 / 1e6 / start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    (mbps, cold)
}

/// The small-object limit: one writer appending 4 KiB and fdatasyncing each, ops/s.
fn disk_small_append_ops(dir: &Path, ops: usize) -> f64 {
    let path = dir.join("disk-small.bin");
    let mut f = std::fs::File::create(&path).expect("create");
    let block = [7u8; 4096];
    let start = Instant::now();
    for _ in 0..ops {
        f.write_all(&block).expect("write");
        f.sync_data().expect("fdatasync");
    }
    let r = ops as f64 / start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    r
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn small_ops(ch: &Channel, ops: usize, concurrency: usize, get: bool) -> (f64, f64, f64) {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let ch = ch.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = FileServiceClient::new(ch);
            let mut lat = Vec::new();
            let mut seed = 1000 + t as u64;
            let mut buf = vec![0u8; 4096];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= ops {
                    break;
                }
                let key = format!("small/{i:08}");
                let t0 = Instant::now();
                if get {
                    let mut s = c
                        .download_file(FileRequest {
                            key,
                            ..Default::default()
                        })
                        .await
                        .expect("get")
                        .into_inner();
                    let mut n = 0;
                    while let Some(m) = s.message().await.expect("get stream") {
                        n += m.data.len();
                    }
                    assert_eq!(n, 4096);
                } else {
                    fill(&mut buf, &mut seed);
                    let msg = FileChunk {
                        file_key: key,
                        data: Bytes::copy_from_slice(&buf),
                        is_last: true,
                        ..Default::default()
                    };
                    c.upload_file(tokio_stream::iter([msg])).await.expect("put");
                }
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    (ops as f64 / secs, percentile(&all, 0.5), percentile(&all, 0.99))
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mib = env_usize("PV_BENCH_MIB", 1024);
    let small = env_usize("PV_BENCH_SMALL_OPS", 20_000);
    let bytes = mib * MIB;
    let work = tempfile::Builder::new()
        .prefix("pv-bench")
        .tempdir_in(std::env::var("PV_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
        .expect("tempdir");
    let server = start_server(&work.path().join("data"));
    let pid = server.child.id();
    let idle_rss = rss_kib(pid);

    let tls_mbps = loopback_tls_mbps(&server.dir.join("tls"), bytes).await;
    let (disk_once, disk_each) = disk_write_mbps(work.path(), bytes);
    let (disk_read, disk_read_cold) = disk_read_mbps(work.path());
    let limit = tls_mbps.min(disk_once);
    let small_limit = disk_small_append_ops(work.path(), (small / 10).clamp(200, 5000));

    let ch = channel(&server).await;
    // 1 GiB upload, 1 MiB messages generated on the fly.
    let (stop, sampler) = rss_sampler(pid);
    let base = rss_kib(pid);
    let cpu = CpuMeter::start(pid);
    let start = Instant::now();
    let (tx, rx) = tokio::sync::mpsc::channel::<FileChunk>(4);
    // Unique content at the cost of a copy: 1 MiB windows of a random pool, each stamped with its
    // index, so no chunk deduplicates and the client spends its CPU on the transfer, as the raw
    // TLS measurement does.
    let mut pool = vec![0u8; 16 * MIB];
    fill(&mut pool, &mut 42u64);
    let producer = tokio::spawn(async move {
        for i in 0..bytes / MIB {
            let at = (i * MIB) % (pool.len() - MIB + 1);
            let mut buf = pool[at..at + MIB].to_vec();
            buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let msg = FileChunk {
                file_key: "bench/big".into(),
                data: Bytes::from(buf),
                offset: (i * MIB) as i64,
                is_last: i == bytes / MIB - 1,
                ..Default::default()
            };
            if tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    FileServiceClient::new(ch.clone())
        .upload_file(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("upload");
    let up_secs = start.elapsed().as_secs_f64();
    let up_cpu = cpu.stop();
    producer.await.expect("producer");
    stop.store(true, Ordering::Relaxed);
    let up_peak = sampler.join().expect("sampler");
    let up_mbps = bytes as f64 / 1e6 / up_secs;
    let rss_after_upload = rss_kib(pid);

    // The download reads what the upload wrote: from the disk when the page cache can be
    // dropped (its limit is then min(TLS, cold disk read)), else from memory (limit: TLS).
    let download_cold = disk_read_cold && drop_page_cache();
    let down_limit = if download_cold {
        tls_mbps.min(disk_read)
    } else {
        tls_mbps
    };
    let (stop, sampler) = rss_sampler(pid);
    let cpu = CpuMeter::start(pid);
    let start = Instant::now();
    let mut s = FileServiceClient::new(ch.clone())
        .download_file(FileRequest {
            key: "bench/big".into(),
            ..Default::default()
        })
        .await
        .expect("download")
        .into_inner();
    let mut got = 0usize;
    while let Some(m) = s.message().await.expect("download stream") {
        got += m.data.len();
    }
    assert_eq!(got, bytes);
    let down_secs = start.elapsed().as_secs_f64();
    let down_cpu = cpu.stop();
    stop.store(true, Ordering::Relaxed);
    let down_peak = sampler.join().expect("sampler");
    let down_mbps = bytes as f64 / 1e6 / down_secs;
    let rss_after_download = rss_kib(pid);

    let batch_before = histogram(server.admin, "peervault_blob_commit_batch_size");
    let secs_before = histogram(server.admin, "peervault_blob_commit_seconds");
    let cpu = CpuMeter::start(pid);
    let (put_ops, put_p50, put_p99) = small_ops(&ch, small, 32, false).await;
    let put_cpu = cpu.stop();
    let batch_after = histogram(server.admin, "peervault_blob_commit_batch_size");
    let secs_after = histogram(server.admin, "peervault_blob_commit_seconds");
    let commits = batch_after.1 - batch_before.1;
    let per_commit = |a: f64, b: f64| if commits > 0.0 { (a - b) / commits } else { 0.0 };
    let ops_per_commit = per_commit(batch_after.0, batch_before.0);
    let commit_ms = per_commit(secs_after.0, secs_before.0) * 1000.0;
    let rss_after_puts = rss_kib(pid);
    let cpu = CpuMeter::start(pid);
    let (get_ops, get_p50, get_p99) = small_ops(&ch, small, 32, true).await;
    let get_cpu = cpu.stop();
    let rss_after_gets = rss_kib(pid);
    let mib_of = |k: u64| k as f64 / 1024.0;
    // CPU per unit of work: ns per byte for streams, µs per operation for small objects.
    let per_byte = |(server, client): (f64, f64)| serde_json::json!({ "server_ns_per_byte": server * 1e9 / bytes as f64, "client_ns_per_byte": client * 1e9 / bytes as f64 });
    let per_op = |(server, client): (f64, f64)| serde_json::json!({ "server_us_per_op": server * 1e6 / small as f64, "client_us_per_op": client * 1e6 / small as f64 });

    let report = serde_json::json!({
        "machine": {
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loopback_tls_mbps": tls_mbps,
            "disk_seq_write_fsync_end_mbps": disk_once,
            "disk_seq_write_fsync_per_mib_mbps": disk_each,
            "disk_seq_read_mbps": disk_read,
            "disk_seq_read_from_cold_cache": disk_read_cold,
            "limit_mbps": limit,
            "disk_4kib_append_fdatasync_ops_per_sec": small_limit,
        },
        "upload_1gib": {
            "bytes": bytes,
            "mbps": up_mbps,
            "fraction_of_limit": up_mbps / limit,
            "target_fraction": 0.60,
            "server_rss_peak_extra_mib": (up_peak.saturating_sub(base)) as f64 / 1024.0,
            "cpu": per_byte(up_cpu),
        },
        "download_1gib": {
            "mbps": down_mbps,
            "from_cold_cache": download_cold,
            "limit_mbps": down_limit,
            "fraction_of_limit": down_mbps / down_limit,
            "target_fraction": 0.75,
            "server_rss_peak_extra_mib": (down_peak.saturating_sub(base)) as f64 / 1024.0,
            "cpu": per_byte(down_cpu),
        },
        "put_4kib_32_streams": { "ops": small, "ops_per_sec": put_ops, "p50_ms": put_p50, "p99_ms": put_p99, "times_small_limit": put_ops / small_limit, "target_times_small_limit": 1.5, "target_p99_ms": 30, "index_commits": commits, "ops_per_index_commit": ops_per_commit, "index_commit_ms_mean": commit_ms, "cpu": per_op(put_cpu) },
        "get_4kib_32_streams": { "ops": small, "ops_per_sec": get_ops, "p50_ms": get_p50, "p99_ms": get_p99, "target_ops_per_sec": 15000, "cpu": per_op(get_cpu) },
        "server_idle_rss_mib": idle_rss as f64 / 1024.0,
        "server_rss_mib": {
            "idle": mib_of(idle_rss),
            "after_upload": mib_of(rss_after_upload),
            "after_download": mib_of(rss_after_download),
            "after_puts": mib_of(rss_after_puts),
            "after_gets": mib_of(rss_after_gets),
        },
        "server_rss_after_mib": rss_kib(pid) as f64 / 1024.0,
    });
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
}
