//! Probe overhead and detection time of the peer service, printed as JSON lines.
//!
//! It starts N lightweight grpc.health.v1 endpoints (mutual TLS, the same development CA) in
//! this process, runs a real `peervault serve peer --peers <the N endpoints>`, waits until all
//! are healthy, then measures over a window: the peer process's CPU (utime+stime from
//! /proc/<pid>/stat), its RSS, and the health checks per second the endpoints answered. Then it
//! makes one endpoint stop answering (its Check hangs, as a SIGSTOPped process would) and times
//! how long the peer service takes to report it `down`, a few times.
//!
//! ```sh
//! cargo build --release --bin peervault
//! cargo run --release -p peervault-peer --example probe_bench -- \
//!     --bin target/release/peervault --peers 100 --window 20 --interval 2s --timeout 1s
//! ```
#![forbid(unsafe_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use peervault_proto::v1::{PeerRequest, peer_service_client::PeerServiceClient};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus, health_server::Health,
    health_server::HealthServer,
};

/// A health endpoint that counts checks and can be made to hang.
#[derive(Clone)]
struct Endpoint0 {
    checks: Arc<AtomicU64>,
    hang: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl Health for Endpoint0 {
    async fn check(
        &self,
        _r: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        self.checks.fetch_add(1, Ordering::Relaxed);
        while self.hang.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(tonic::Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    type WatchStream = tokio_stream::Empty<Result<HealthCheckResponse, tonic::Status>>;

    async fn watch(
        &self,
        _r: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not needed"))
    }
}

struct Args {
    bin: PathBuf,
    peers: usize,
    window: u64,
    interval: String,
    timeout: String,
    down_after: u32,
    samples: usize,
}

fn args() -> Args {
    let mut a = Args {
        bin: PathBuf::from("target/release/peervault"),
        peers: 100,
        window: 20,
        interval: "2s".into(),
        timeout: "1s".into(),
        down_after: 3,
        samples: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_default();
        match k.as_str() {
            "--bin" => a.bin = v.into(),
            "--peers" => a.peers = v.parse().unwrap_or(a.peers),
            "--window" => a.window = v.parse().unwrap_or(a.window),
            "--interval" => a.interval = v,
            "--timeout" => a.timeout = v,
            "--down-after" => a.down_after = v.parse().unwrap_or(a.down_after),
            "--samples" => a.samples = v.parse().unwrap_or(a.samples),
            other => eprintln!("ignoring unknown argument {other}"),
        }
    }
    a
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the state field.
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn metrics(admin: SocketAddr) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(admin) else {
        return String::new();
    };
    let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().expect("tempdir");
    let tls_dir = tmp.path().join("data").join("tls");
    peervault_runtime::tls::ensure_dev_certs(&tls_dir, "peervault.local").expect("certificates");
    let read = |f: &str| std::fs::read(tls_dir.join(f)).expect("read certificate");

    // N health endpoints.
    let checks = Arc::new(AtomicU64::new(0));
    let mut endpoints = Vec::new();
    let mut hangs = Vec::new();
    for _ in 0..a.peers {
        let hang = Arc::new(AtomicBool::new(false));
        let svc = Endpoint0 {
            checks: checks.clone(),
            hang: hang.clone(),
        };
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(read("server.crt"), read("server.key")))
            .client_ca_root(Certificate::from_pem(read("ca.crt")));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        endpoints.push(listener.local_addr().expect("addr").to_string());
        hangs.push(hang);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .tls_config(tls)
                .expect("tls")
                .add_service(HealthServer::new(svc))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
    }

    // The peer service.
    let mut child = Command::new(&a.bin)
        .args(["serve", "peer", "--data-dir"])
        .arg(tmp.path().join("data"))
        .args(["--grpc-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--log-format", "json", "--log", "warn,peervault_runtime=info"])
        .args(["--peers", &endpoints.join(",")])
        .args(["--probe-interval", &a.interval, "--probe-timeout", &a.timeout])
        .args(["--probe-down-after", &a.down_after.to_string()])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn peervault (build it first, or pass --bin)");
    let pid = child.id();
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (grpc, admin) = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("peervault never became ready");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["message"] == "peervault ready"
        {
            let g: SocketAddr = v["grpc_addr"].as_str().unwrap_or_default().parse().expect("grpc addr");
            let ad: SocketAddr = v["admin_addr"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .expect("admin addr");
            break (g, ad);
        }
    };
    let t_ready = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    while sum_metric(&metrics(admin), "peervault_peer_up") < a.peers as f64 {
        assert!(Instant::now() < deadline, "not every endpoint became healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_healthy_after = t_ready.elapsed();

    // Overhead over the window.
    let (c0, n0, t0) = (cpu_seconds(pid), checks.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(a.window)).await;
    let (c1, n1, wall) = (
        cpu_seconds(pid),
        checks.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    );
    let m = metrics(admin);
    println!(
        "{}",
        serde_json::json!({
            "measure": "probe_overhead",
            "peers": a.peers,
            "probe_interval": a.interval,
            "probe_timeout": a.timeout,
            "window_s": wall,
            "all_healthy_after_s": all_healthy_after.as_secs_f64(),
            "checks_per_s": (n1 - n0) as f64 / wall,
            "expected_checks_per_s": a.peers as f64 / humantime::parse_duration(&a.interval).map(|d| d.as_secs_f64()).unwrap_or(1.0),
            "peer_cpu_percent_of_one_core": (c1 - c0) / wall * 100.0,
            "peer_rss_mib": rss_kib(pid) as f64 / 1024.0,
            "machine_cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "probes_failed": sum_metric(&m, "peervault_peer_probes_total{result=\"timeout\"}"),
        })
    );

    // Detection time: one endpoint stops answering.
    let ca = Certificate::from_pem(read("ca.crt"));
    let tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(ca)
        .identity(Identity::from_pem(read("client.crt"), read("client.key")));
    let channel = Endpoint::from_shared(format!("https://{grpc}"))
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect to the peer service");
    let mut client = PeerServiceClient::new(channel);
    let mut samples = Vec::new();
    for i in 0..a.samples {
        let idx = i % a.peers;
        let id = endpoints[idx].clone();
        hangs[idx].store(true, Ordering::Relaxed);
        let t = Instant::now();
        loop {
            let h = client
                .get_peer_health(PeerRequest { id: id.clone() })
                .await
                .map(|r| r.into_inner().status)
                .unwrap_or_default();
            if h == "down" {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "{id} never went down");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
        hangs[idx].store(false, Ordering::Relaxed);
        let t = Instant::now();
        loop {
            let h = client
                .get_peer_health(PeerRequest { id: id.clone() })
                .await
                .map(|r| r.into_inner().status)
                .unwrap_or_default();
            if h == "healthy" {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "{id} never came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let interval = humantime::parse_duration(&a.interval).unwrap_or(Duration::from_secs(2));
    let timeout = humantime::parse_duration(&a.timeout).unwrap_or(Duration::from_secs(1));
    let bound = interval.max(timeout) * a.down_after + timeout;
    println!(
        "{}",
        serde_json::json!({
            "measure": "detection_time_ms",
            "peers": a.peers,
            "probe_interval": a.interval,
            "probe_timeout": a.timeout,
            "down_after": a.down_after,
            "samples_ms": samples,
            "max_ms": samples.iter().cloned().fold(0.0, f64::max),
            "bound_ms": bound.as_secs_f64() * 1000.0,
        })
    );
    let _ = child.kill();
    let _ = child.wait();
}
