//! Publish→deliver benchmark of the events service, printed as JSON (not part of the tests).
//!
//! ```sh
//! cargo build --release --bin peervault
//! cargo bench -p peervault-events --bench fanout            # PEERVAULT_BIN=… to pick a binary
//! ```
//!
//! For 1, 100 and 1,000 subscribers over gRPC (Subscribe) and over WebSocket it starts a real
//! `peervault serve events` process with the development certificates, then measures
//! (a) throughput: a publisher (service identity, batches of 200 events of ~200 bytes) as fast
//! as it can for a few seconds; deliveries/s counted at the subscribers, lagged events counted;
//! (b) latency at a fixed 10,000 events/s: publish→deliver p50/p99/max from the timestamp set
//! just before the Publish call to the moment the subscriber decoded the event;
//! and the server's RSS (VmRSS and peak VmHWM). Beside the figures it reports this machine's raw
//! loopback TCP throughput measured in the same run.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures_util::{SinkExt, StreamExt};
use peervault_proto::v1::{
    Event, PublishRequest, SubscribeRequest, event::Payload, event_service_client::EventServiceClient,
};
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const SECONDS: u64 = 3;

/// Distinguishes the event ids of successive runs.
static RUN: AtomicU64 = AtomicU64::new(0);

/// Log-scale latency histogram: bucket i holds [1.05^i, 1.05^(i+1)) microseconds.
#[derive(Clone)]
struct Hist(Vec<u64>);

impl Hist {
    fn new() -> Self {
        Hist(vec![0; 400])
    }
    fn add(&mut self, us: f64) {
        let i = if us <= 1.0 {
            0
        } else {
            (us.ln() / 1.05f64.ln()) as usize
        };
        let n = self.0.len();
        self.0[i.min(n - 1)] += 1;
    }
    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a += b;
        }
    }
    fn count(&self) -> u64 {
        self.0.iter().sum()
    }
    fn quantile_ms(&self, q: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let target = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for (i, c) in self.0.iter().enumerate() {
            seen += c;
            if seen >= target {
                return 1.05f64.powi(i as i32 + 1) / 1000.0;
            }
        }
        1.05f64.powi(self.0.len() as i32) / 1000.0
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

struct Server {
    child: Child,
    grpc: String,
    http: String,
    tls: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(bin: &PathBuf) -> Server {
        use std::io::{BufRead, BufReader};
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let mut child = Command::new(bin)
            .args(["serve", "events", "--data-dir"])
            .arg(&data)
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args([
                "--log-format",
                "json",
                "--log",
                "warn,peervault_runtime=info,peervault_events=info",
            ])
            .args(["--metrics-interval", "0s", "--events-subscriber-queue", "16384"])
            .args(["--ws-max-connections", "5000", "--max-concurrent-streams", "1000"])
            // Every WebSocket client of the benchmark comes from 127.0.0.1.
            .args(["--ws-max-connections-per-address", "5000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn peervault (build it with: cargo build --release --bin peervault)");
        let out = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(out).lines();
        let (mut grpc, mut http) = (String::new(), String::new());
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(Ok(line)) = lines.next() {
            let v: Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "events HTTP listening" {
                http = v["http_addr"].as_str().unwrap_or_default().to_string();
            }
            if v["message"] == "peervault ready" {
                grpc = v["grpc_addr"].as_str().unwrap_or_default().to_string();
                break;
            }
            assert!(Instant::now() < deadline, "server did not start");
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Server {
            child,
            grpc,
            http,
            tls: data.join("tls"),
            _tmp: tmp,
        }
    }

    /// A TLS config for WebSocket clients: trusts the development CA and presents the
    /// development client certificate (the gateway requires credentials).
    fn ws_tls(&self) -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> {
        use tokio_rustls::rustls::{
            self, RootCertStore,
            pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.tls.join("ca.crt")).expect("ca.crt") {
            roots.add(c.expect("CA certificate")).expect("CA");
        }
        let certs: Vec<_> = CertificateDer::pem_file_iter(self.tls.join("client.crt"))
            .expect("client.crt")
            .map(|c| c.expect("client certificate"))
            .collect();
        let key = PrivateKeyDer::from_pem_file(self.tls.join("client.key")).expect("client.key");
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .expect("client certificate");
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        std::sync::Arc::new(cfg)
    }

    async fn channel(&self, service: bool) -> Channel {
        let (c, k) = if service {
            ("server", "server")
        } else {
            ("client", "client")
        };
        let read = |n: String| std::fs::read(self.tls.join(n)).expect("dev certificate");
        let tls = ClientTlsConfig::new()
            .domain_name("localhost")
            .ca_certificate(Certificate::from_pem(read("ca.crt".into())))
            .identity(Identity::from_pem(read(format!("{c}.crt")), read(format!("{k}.key"))));
        Endpoint::from_shared(format!("https://{}", self.grpc))
            .expect("uri")
            .tls_config(tls)
            .expect("tls")
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .connect()
            .await
            .expect("connect")
    }

    fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// What subscribers saw.
#[derive(Default)]
struct Tally {
    received: AtomicU64,
    missed: AtomicU64,
    hist: std::sync::Mutex<Option<Hist>>,
}

impl Tally {
    fn record(&self, n: u64, missed: u64, h: &Hist) {
        self.received.fetch_add(n, Ordering::Relaxed);
        self.missed.fetch_add(missed, Ordering::Relaxed);
        let mut g = self.hist.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_mut() {
            Some(x) => x.merge(h),
            None => *g = Some(h.clone()),
        }
    }
}

fn event(i: u64) -> Event {
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Event {
        // Unique across runs against one server (ids repeated within the replay window are
        // dropped as duplicates).
        id: format!("bench-{}-{i}", RUN.load(Ordering::Relaxed)),
        topic: "file_operations".into(),
        r#type: "file_uploaded".into(),
        source: "blob/bench".into(),
        timestamp: Some(prost_types::Timestamp {
            seconds: ts.as_secs() as i64,
            nanos: ts.subsec_nanos() as i32,
        }),
        data_json:
            json!({"key": format!("bench/{i:012}"), "size": 1024, "node": "bench-0", "t_ns": ts.as_nanos() as u64})
                .to_string(),
        ..Default::default()
    }
}

/// Starts `n` gRPC subscribers (50 per connection); returns once all are subscribed.
async fn grpc_subscribers(
    server: &Server,
    n: usize,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let mut ch = server.channel(false).await;
    for i in 0..n {
        if i > 0 && i % 50 == 0 {
            ch = server.channel(false).await;
        }
        let mut stream = EventServiceClient::new(ch.clone())
            .max_decoding_message_size(16 << 20)
            .subscribe(SubscribeRequest {
                topics: vec!["file_operations".into()],
                ..Default::default()
            })
            .await
            .expect("subscribe")
            .into_inner();
        let tally = tally.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Hist::new();
            let (mut n, mut missed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(200), stream.message()).await {
                    Ok(Ok(Some(e))) => match &e.payload {
                        Some(Payload::Lagged(l)) => missed += l.missed,
                        _ => {
                            if let Some(ts) = e.timestamp {
                                let sent = ts.seconds as u128 * 1_000_000_000 + ts.nanos as u128;
                                h.add(now_ns().saturating_sub(sent) as f64 / 1000.0);
                            }
                            n += 1;
                            if n % 64 == 0 {
                                tally.received.fetch_add(64, Ordering::Relaxed);
                            }
                        }
                    },
                    Ok(_) => break,
                    Err(_) => continue,
                }
            }
            tally.record(n % 64, missed, &h);
        }));
    }
    tasks
}

/// Starts `n` WebSocket subscribers; returns once all are subscribed.
async fn ws_subscribers(
    server: &Server,
    n: usize,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    use tokio_tungstenite::tungstenite::Message;
    let mut tasks = Vec::new();
    let tls = tokio_rustls::TlsConnector::from(server.ws_tls());
    for _ in 0..n {
        // wss:// with the development client certificate, as the gateway requires by default.
        let tcp = tokio::net::TcpStream::connect(&server.http).await.expect("TCP connect");
        let _ = tcp.set_nodelay(true);
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let io = tls.connect(name, tcp).await.expect("TLS handshake");
        let url = format!(
            "wss://localhost:{}/ws",
            server.http.rsplit(':').next().unwrap_or_default()
        );
        let (mut ws, _) = tokio_tungstenite::client_async(url, io)
            .await
            .expect("WebSocket connect");
        ws.send(Message::text(r#"{"type":"subscribe","topic":"file_operations"}"#))
            .await
            .expect("send");
        // Welcome, then the subscription's confirmation.
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str().contains("\"subscribed\"") => break,
                Some(Ok(_)) => continue,
                other => panic!("subscribe failed: {other:?}"),
            }
        }
        let tally = tally.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Hist::new();
            let (mut n, mut missed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let s = t.as_str();
                        if let Some(i) = s.find("\"t_ns\":") {
                            let digits: String = s[i + 7..].chars().take_while(|c| c.is_ascii_digit()).collect();
                            if let Ok(sent) = digits.parse::<u128>() {
                                h.add(now_ns().saturating_sub(sent) as f64 / 1000.0);
                            }
                            n += 1;
                            if n % 64 == 0 {
                                tally.received.fetch_add(64, Ordering::Relaxed);
                            }
                        } else if s.contains("\"lagged\"") {
                            let v: Value = serde_json::from_str(s).unwrap_or_default();
                            missed += v["data"]["missed"].as_u64().unwrap_or(0);
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(_) => break,
                    Err(_) => continue,
                }
            }
            tally.record(n % 64, missed, &h);
        }));
    }
    tasks
}

/// Publishes for SECONDS: as fast as possible (`rate` None) or at `rate` events/s. Returns
/// (events published, start, end).
async fn publisher(server: &Server, rate: Option<u64>) -> (u64, Instant, Instant) {
    RUN.fetch_add(1, Ordering::Relaxed);
    let ch = server.channel(true).await;
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end_at = start + Duration::from_secs(SECONDS);
    let mut tasks = Vec::new();
    let (workers, batch) = match rate {
        None => (2, 200u64),
        Some(_) => (1, 10u64),
    };
    for _ in 0..workers {
        let mut client = EventServiceClient::new(ch.clone()).max_encoding_message_size(16 << 20);
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut next_at = tokio::time::Instant::now();
            while Instant::now() < end_at {
                let base = counter.fetch_add(batch, Ordering::Relaxed);
                let events = (base..base + batch).map(event).collect();
                match client.publish(PublishRequest { events }).await {
                    Ok(r) if r.get_ref().accepted as u64 == batch => {}
                    Ok(r) => eprintln!("only {} of {batch} events accepted", r.get_ref().accepted),
                    Err(e) => {
                        eprintln!("publish failed: {e}");
                        break;
                    }
                }
                if let Some(r) = rate {
                    next_at += Duration::from_secs_f64(batch as f64 / r as f64);
                    tokio::time::sleep_until(next_at).await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (counter.load(Ordering::Relaxed), start, Instant::now())
}

async fn scenario(bin: &PathBuf, transport: &str, subs: usize) -> Value {
    let server = Server::start(bin);
    let idle = server.rss_kib();
    let mut out = json!({"transport": transport, "subscribers": subs, "server_rss_idle_mib": idle.0 as f64 / 1024.0});
    for (name, rate) in [("throughput", None), ("latency_10k_per_s", Some(10_000u64))] {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = match transport {
            "grpc" => grpc_subscribers(&server, subs, tally.clone(), stop.clone()).await,
            _ => ws_subscribers(&server, subs, tally.clone(), stop.clone()).await,
        };
        let connected_rss = server.rss_kib();
        let (published, start, end) = publisher(&server, rate).await;
        // Let subscribers drain: until every delivery arrived, or nothing arrived for 1 s (at
        // most 30 s).
        let expected = published * subs as u64;
        let drain_deadline = Instant::now() + Duration::from_secs(30);
        let (mut seen, mut last_change) = (0u64, Instant::now());
        let mut done_at = end;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now_seen = tally.received.load(Ordering::Relaxed) + tally.missed.load(Ordering::Relaxed);
            if now_seen != seen {
                seen = now_seen;
                last_change = Instant::now();
                done_at = last_change;
            }
            if seen + 64 * subs as u64 >= expected && last_change.elapsed() > Duration::from_millis(200)
                || last_change.elapsed() > Duration::from_secs(1)
                || Instant::now() > drain_deadline
            {
                break;
            }
        }
        let busy_rss = server.rss_kib();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let delivered = tally.received.load(Ordering::Relaxed);
        let secs = done_at.max(end).duration_since(start).as_secs_f64();
        let hist = tally
            .hist
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(Hist::new);
        out[name] = json!({
            "published": published,
            "publish_rate_per_s": (published as f64 / end.duration_since(start).as_secs_f64()).round(),
            "deliveries": delivered,
            "deliveries_per_s": (delivered as f64 / secs).round(),
            "expected_deliveries": published * subs as u64,
            "missed_by_lag": tally.missed.load(Ordering::Relaxed),
            "latency_ms": {
                "p50": hist.quantile_ms(0.50),
                "p99": hist.quantile_ms(0.99),
                "p999": hist.quantile_ms(0.999),
                "max": hist.quantile_ms(1.0),
            },
            "server_rss_connected_mib": connected_rss.0 as f64 / 1024.0,
            "server_rss_after_mib": busy_rss.0 as f64 / 1024.0,
            "server_rss_peak_mib": busy_rss.1 as f64 / 1024.0,
        });
        eprintln!("{transport} x{subs} {name}: {}", out[name]);
    }
    out
}

/// Raw loopback TCP throughput of this machine, for scale.
async fn loopback_mib_per_s() -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let reader = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let buf = vec![7u8; 1 << 16];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        if s.write_all(&buf).await.is_err() {
            break;
        }
    }
    drop(s);
    let total = reader.await.unwrap_or(0);
    total as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("PEERVAULT_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/fanout-… → target/release/peervault
    let exe = std::env::current_exe().unwrap_or_default();
    let target = exe.ancestors().nth(3).map(PathBuf::from).unwrap_or_default();
    target.join("release").join("peervault")
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filters scenarios by name (`grpc`, `ws`).
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let bin = binary();
    if !bin.exists() {
        eprintln!(
            "{} not found: run `cargo build --release --bin peervault` first or set PEERVAULT_BIN",
            bin.display()
        );
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut results = Vec::new();
        for transport in ["grpc", "websocket"] {
            for subs in [1usize, 100, 1000] {
                let name = format!("{transport}-{subs}");
                if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
                    continue;
                }
                results.push(scenario(&bin, transport, subs).await);
            }
        }
        let report = json!({
            "benchmark": "events publish→deliver",
            "published_data_json_bytes": event(0).data_json.len(),
            "seconds_per_run": SECONDS,
            "machine": {
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "loopback_tcp_mib_per_s": loopback_mib_per_s().await.round(),
            },
            "targets": {
                "grpc_100_deliveries_per_s": 200000,
                "p99_ms_at_10k_per_s": 5.0,
                "ws_1000_rss_mib": 200,
            },
            "results": results,
        });
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    });
}
