//! Replication benchmark (`cargo bench --bench cluster`): the same workloads on one pod (`serve
//! all`) and on three blob pods with R=3 (a peer service with static discovery, one shared
//! development CA), in the same run and on the same machine, beside its limits (raw disk write
//! with fsync). Then: repair throughput after a pod that was down rejoins, and the time a
//! fourth pod takes to receive its share. Prints one JSON document.
//!
//! The three pods share this machine's cores and disk, so every replicated byte is written
//! three times to the same device: the figures are a floor for pods on separate machines.
//! Sizes: `PV_BENCH_MIB` (1024), `PV_BENCH_SMALL_OPS` (5000), `PV_BENCH_REPAIR_MIB` (256).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
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

fn fill(buf: &mut [u8], seed: &mut u64) {
    for c in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = seed.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

struct Proc {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
    dir: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(role: &str, dir: &Path, grpc: &str, extra: &[String]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_peervault"))
        .args(["serve", role, "--data-dir"])
        .arg(dir)
        .args([
            "--grpc-listen",
            grpc,
            "--admin-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--log-format", "json", "--log", "warn,peervault_runtime=info"])
        .args(extra)
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
            break (
                v["grpc_addr"].as_str().expect("grpc_addr").parse().expect("addr"),
                v["admin_addr"].as_str().expect("admin_addr").parse().expect("addr"),
            );
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Proc {
        child,
        grpc,
        admin,
        dir: dir.to_path_buf(),
    }
}

fn metric(p: &Proc, name: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(p.admin).expect("admin");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn wait_metric(p: &Proc, name: &str, pred: impl Fn(f64) -> bool, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if pred(metric(p, name)) {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{name} never reached the condition");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn channel(addr: SocketAddr, tls: &Path) -> Channel {
    let read = |f: &str| std::fs::read(tls.join(f)).expect("tls file");
    let cfg = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(read("ca.crt")))
        .identity(Identity::from_pem(read("client.crt"), read("client.key")));
    Endpoint::from_shared(format!("https://{addr}"))
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

/// Uploads `bytes` of unique content as `key` in 1 MiB messages: MB/s.
async fn upload(ch: &Channel, key: &str, bytes: usize, seed: u64) -> f64 {
    let start = Instant::now();
    let (tx, rx) = tokio::sync::mpsc::channel::<FileChunk>(4);
    let mut pool = vec![0u8; 16 * MIB];
    fill(&mut pool, &mut (seed | 1));
    let key = key.to_string();
    let producer = tokio::spawn(async move {
        for i in 0..bytes / MIB {
            let at = (i * MIB) % (pool.len() - MIB + 1);
            let mut buf = pool[at..at + MIB].to_vec();
            buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
            buf[8..16].copy_from_slice(&seed.to_le_bytes());
            let msg = FileChunk {
                file_key: key.clone(),
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
    producer.await.expect("producer");
    bytes as f64 / 1e6 / start.elapsed().as_secs_f64()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// 4 KiB puts or gets with 32 streams spread over `chans`: (ops/s, p50 ms, p99 ms).
async fn small_ops(chans: &[Channel], ops: usize, get: bool) -> (f64, f64, f64) {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..32usize {
        let ch = chans[t % chans.len()].clone();
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

/// Raw sequential disk write with one fsync at the end: MB/s.
fn disk_write_mbps(dir: &Path, bytes: usize) -> f64 {
    let mut block = vec![0u8; MIB];
    fill(&mut block, &mut 11u64);
    let path = dir.join("disk-bench.bin");
    let start = Instant::now();
    let mut f = std::fs::File::create(&path).expect("create");
    for _ in 0..bytes / MIB {
        f.write_all(&block).expect("write");
    }
    f.sync_all().expect("fsync");
    let mbps = bytes as f64 / 1e6 / start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    mbps
}

struct Three {
    _peer: Proc,
    pods: Vec<Option<Proc>>,
    ports: Vec<u16>,
    dirs: Vec<PathBuf>,
    peer_port: u16,
    tls: PathBuf,
}

fn blob_args(peer_port: u16) -> Vec<String> {
    vec![
        "--peer-endpoint".into(),
        format!("127.0.0.1:{peer_port}"),
        "--anti-entropy-interval".into(),
        "2s".into(),
        "--repair-bytes-per-second".into(),
        "0".into(),
    ]
}

fn copy_tls(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("tls")).expect("tls dir");
    for f in ["ca.crt", "server.crt", "server.key", "client.crt", "client.key"] {
        std::fs::copy(from.join(f), to.join("tls").join(f)).expect("copy tls");
    }
}

fn start_three(work: &Path, tls: &Path, n_listed: usize, n_total: usize) -> Three {
    let peer_port = free_port();
    let ports: Vec<u16> = (0..n_total).map(|_| free_port()).collect();
    let dirs: Vec<PathBuf> = (0..n_total).map(|i| work.join(format!("pod-{i}"))).collect();
    for d in &dirs {
        copy_tls(tls, d);
    }
    let pdir = work.join("peer");
    copy_tls(tls, &pdir);
    let list: Vec<String> = ports[..n_listed].iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let peer = start(
        "peer",
        &pdir,
        &format!("127.0.0.1:{peer_port}"),
        &[
            "--discovery".into(),
            "static".into(),
            "--peers".into(),
            list.join(","),
            "--probe-interval".into(),
            "200ms".into(),
            "--probe-timeout".into(),
            "300ms".into(),
        ],
    );
    let pods = (0..n_listed)
        .map(|i| {
            Some(start(
                "blob",
                &dirs[i],
                &format!("127.0.0.1:{}", ports[i]),
                &blob_args(peer_port),
            ))
        })
        .collect::<Vec<_>>();
    for p in pods.iter().flatten() {
        wait_metric(
            p,
            "peervault_replication_members",
            |v| v == n_listed as f64,
            Duration::from_secs(30),
        );
    }
    Three {
        _peer: peer,
        pods,
        ports,
        dirs,
        peer_port,
        tls: tls.to_path_buf(),
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mib = env_usize("PV_BENCH_MIB", 1024);
    let small = env_usize("PV_BENCH_SMALL_OPS", 5000);
    let repair_mib = env_usize("PV_BENCH_REPAIR_MIB", 256);
    let bytes = mib * MIB;
    let work = tempfile::Builder::new()
        .prefix("pv-cluster-bench")
        .tempdir_in(std::env::var("PV_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
        .expect("tempdir");
    let disk = disk_write_mbps(work.path(), 512 * MIB);

    // One pod.
    let single = start("all", &work.path().join("single"), "127.0.0.1:0", &[]);
    let tls = single.dir.join("tls");
    let ch = channel(single.grpc, &tls).await;
    let one_up = upload(&ch, "bench/big", bytes, 1).await;
    let (one_put, one_put_p50, one_put_p99) = small_ops(std::slice::from_ref(&ch), small, false).await;
    let (one_get, one_get_p50, one_get_p99) = small_ops(std::slice::from_ref(&ch), small, true).await;
    drop(ch);
    drop(single);
    let _ = std::fs::remove_dir_all(work.path().join("single").join("blob"));

    // Three pods, R = 3; clients spread over the pods.
    let mut three = start_three(&work.path().join("three"), &tls, 3, 3);
    let chans: Vec<Channel> = {
        let mut v = Vec::new();
        for p in three.pods.iter().flatten() {
            v.push(channel(p.grpc, &tls).await);
        }
        v
    };
    let three_up = upload(&chans[0], "bench/big", bytes, 1).await;
    let (three_put, three_put_p50, three_put_p99) = small_ops(&chans, small, false).await;
    let (three_get, three_get_p50, three_get_p99) = small_ops(&chans, small, true).await;

    // Repair: pod 2 down while files are written, then back; time until the queues drain.
    if let Some(mut p) = three.pods[2].take() {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
    let files = (repair_mib / 8).max(1);
    for i in 0..files {
        upload(&chans[0], &format!("repair/{i:04}"), 8 * MIB, 100 + i as u64).await;
    }
    let start_repair = Instant::now();
    three.pods[2] = Some(start(
        "blob",
        &three.dirs[2],
        &format!("127.0.0.1:{}", three.ports[2]),
        &blob_args(three.peer_port),
    ));
    for p in three.pods.iter().flatten() {
        wait_metric(
            p,
            "peervault_replication_handoff_queue_depth",
            |v| v == 0.0,
            Duration::from_secs(600),
        );
    }
    let repair_secs = start_repair.elapsed().as_secs_f64();
    let repair_mbps = (files * 8 * MIB) as f64 / 1e6 / repair_secs;
    drop(chans);
    drop(three);
    let _ = std::fs::remove_dir_all(work.path().join("three"));

    // A fourth pod joins 3 pods holding `mib` MiB in 16 MiB files: time until it holds its share.
    let four = start_three(&work.path().join("four"), &tls, 3, 4);
    let ch = channel(four.pods[0].as_ref().expect("pod").grpc, &four.tls).await;
    let n16 = (mib / 16).max(1);
    for i in 0..n16 {
        upload(&ch, &format!("share/{i:04}"), 16 * MIB, 500 + i as u64).await;
    }
    let fourth = start(
        "blob",
        &four.dirs[3],
        &format!("127.0.0.1:{}", four.ports[3]),
        &blob_args(four.peer_port),
    );
    let peer_ch = channel(four._peer.grpc, &four.tls).await;
    let join = Instant::now();
    peervault_proto::v1::peer_service_client::PeerServiceClient::new(peer_ch)
        .add_peer(peervault_proto::v1::AddPeerRequest {
            address: "127.0.0.1".into(),
            port: four.ports[3] as i32,
            ..Default::default()
        })
        .await
        .expect("add peer");
    // Its share: the files whose owners under four members include it.
    let ids: Vec<String> = four.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let members: Vec<peervault_blob::cluster::placement::Member> = ids
        .iter()
        .map(|id| peervault_blob::cluster::placement::Member {
            id: id.clone(),
            zone: String::new(),
            node: String::new(),
        })
        .collect();
    let share = (0..n16)
        .filter(|i| {
            let k = format!("share/{i:04}");
            peervault_blob::cluster::placement::owners_of(
                peervault_blob::store::replica::key_partition(&k),
                &members,
                3,
            )
            .contains(&ids[3])
        })
        .count();
    wait_metric(
        &fourth,
        "peervault_blob_files",
        |v| v >= share as f64,
        Duration::from_secs(900),
    );
    let join_secs = join.elapsed().as_secs_f64();

    let report = serde_json::json!({
        "machine": {
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "disk_seq_write_fsync_end_mbps": disk,
            "note": "all pods share these cores and this disk: R=3 writes every byte three times to one device",
        },
        "upload": {
            "bytes": bytes,
            "one_pod_mbps": one_up,
            "three_pods_r3_mbps": three_up,
            "fraction": three_up / one_up,
            "target_fraction": 0.5,
        },
        "put_4kib_c32": {
            "ops": small,
            "one_pod_ops_per_sec": one_put, "one_pod_p50_ms": one_put_p50, "one_pod_p99_ms": one_put_p99,
            "three_pods_ops_per_sec": three_put, "three_pods_p50_ms": three_put_p50, "three_pods_p99_ms": three_put_p99,
            "fraction": three_put / one_put,
            "target_fraction": 0.4,
        },
        "get_4kib_c32": {
            "ops": small,
            "one_pod_ops_per_sec": one_get, "one_pod_p50_ms": one_get_p50, "one_pod_p99_ms": one_get_p99,
            "three_pods_ops_per_sec": three_get, "three_pods_p50_ms": three_get_p50, "three_pods_p99_ms": three_get_p99,
            "fraction": three_get / one_get,
            "target_fraction": 0.8,
        },
        "repair_after_rejoin": {
            "bytes": files * 8 * MIB,
            "seconds": repair_secs,
            "mbps": repair_mbps,
            "fraction_of_disk": repair_mbps / disk,
        },
        "fourth_pod_share": {
            "store_bytes": n16 * 16 * MIB,
            "files_in_share": share,
            "seconds": join_secs,
        },
    });
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
}
