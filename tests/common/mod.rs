//! Test harness: real `peervault` processes on 127.0.0.1 free ports with generated certificates,
//! and real gRPC clients over mutual TLS.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub mod cluster;
pub mod graviton;
pub mod proxy;
pub mod ws;

/// The server binary built for these tests (`PEERVAULT_TEST_BIN` runs the same tests against
/// another build, e.g. to show a test fails before a fix).
pub fn peervault_bin() -> PathBuf {
    std::env::var_os("PEERVAULT_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_peervault")))
}

/// Upper bound for any wait in these tests; only reached when something is broken.
pub const WAIT: Duration = Duration::from_secs(30);

/// A running `peervault serve <role>`.
pub struct Node {
    child: Child,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    lines: mpsc::Receiver<String>,
    _tmp: Option<tempfile::TempDir>,
}

pub struct NodeBuilder {
    role: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    data_dir: Option<PathBuf>,
}

impl NodeBuilder {
    pub fn new(role: &str) -> Self {
        NodeBuilder {
            role: role.into(),
            args: vec![],
            envs: vec![],
            data_dir: None,
        }
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }
    pub fn data_dir(mut self, d: &Path) -> Self {
        self.data_dir = Some(d.to_path_buf());
        self
    }

    /// Spawns the process on free ports and waits for its "peervault ready" log line.
    pub fn start(self) -> Node {
        self.start_listening("127.0.0.1:0", "127.0.0.1:0").0
    }
}

impl Node {
    pub fn start(role: &str) -> Node {
        NodeBuilder::new(role).start()
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("tls")
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.grpc)
    }

    /// A channel with the development client certificate.
    pub async fn channel(&self) -> Channel {
        let d = self.tls_dir();
        channel_with(
            self.grpc,
            Some(&d.join("ca.crt")),
            Some((&d.join("client.crt"), &d.join("client.key"))),
        )
        .await
    }

    /// A channel presenting the server certificate, i.e. a service identity.
    pub async fn service_channel(&self) -> Channel {
        let d = self.tls_dir();
        channel_with(
            self.grpc,
            Some(&d.join("ca.crt")),
            Some((&d.join("server.crt"), &d.join("server.key"))),
        )
        .await
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal by name (`TERM`, `INT`, `STOP`, `CONT`, `KILL`) with the real `kill`.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -s {sig} failed");
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "process did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Log lines printed since start (or since the last call), waiting up to `limit` for one
    /// matching `pred`.
    pub fn wait_log(&self, limit: Duration, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).expect("expected log line never came");
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && pred(&v)
            {
                return v;
            }
        }
    }

    /// GET on the admin port: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }

    /// The value of one sample in `/metrics` whose line starts with `prefix` and contains every
    /// string of `labels`.
    pub fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let (_, body) = self.admin_get("/metrics");
        metric_value(&body, name, labels)
    }

    /// Polls `/metrics` until the metric satisfies `pred` (bounded).
    pub fn wait_metric(&self, name: &str, labels: &[&str], pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = self.metric(name, labels)
                && pred(v)
            {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "metric {name}{labels:?} never satisfied the condition"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn metric_value(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// A minimal HTTP/1.1 GET, enough for the admin port.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read admin response");
    let status = buf.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Bodies may be chunked; the tests only search them, so chunk-size lines are harmless.
    (status, body)
}

/// A channel to `addr` trusting `ca` and presenting `identity` (cert, key), connected now.
pub async fn channel_with(addr: SocketAddr, ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Channel {
    try_channel(addr, ca, identity).await.expect("connect")
}

pub async fn try_channel(
    addr: SocketAddr,
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().domain_name("localhost");
    if let Some(ca) = ca {
        tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    }
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(std::fs::read(c).unwrap(), std::fs::read(k).unwrap()));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

impl NodeBuilder {
    /// As [`NodeBuilder::start`], with the gRPC and HTTP listen addresses given (`127.0.0.1:0`
    /// for a free port), also returning the JSON log lines printed before "peervault ready"
    /// (for example the events service's `events HTTP listening` line with `http_addr`).
    // The child is waited for by `Node::drop`, or right before the panic below.
    #[allow(clippy::zombie_processes)]
    pub fn start_listening(self, grpc_listen: &str, http_listen: &str) -> (Node, Vec<serde_json::Value>) {
        let (tmp, dir) = match self.data_dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().expect("tempdir");
                let d = t.path().join("data");
                (Some(t), d)
            }
        };
        let mut cmd = Command::new(peervault_bin());
        cmd.arg("serve")
            .arg(&self.role)
            .arg("--data-dir")
            .arg(&dir)
            .args(["--grpc-listen", grpc_listen, "--admin-listen", "127.0.0.1:0"])
            .args(["--http-listen", http_listen])
            .args(["--log-format", "json"])
            .args(&self.args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn peervault");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx2.send(format!("stderr: {line}")).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        let mut logs = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if v["message"] == "peervault ready" {
                            let grpc = v["grpc_addr"].as_str().unwrap().parse().unwrap();
                            let admin = v["admin_addr"].as_str().unwrap().parse().unwrap();
                            let node = Node {
                                child,
                                grpc,
                                admin,
                                data_dir: dir,
                                lines: rx,
                                _tmp: tmp,
                            };
                            return (node, logs);
                        }
                        logs.push(v);
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "peervault serve {} did not become ready; output:\n{}",
                        self.role,
                        seen.join("\n")
                    );
                }
            }
        }
    }

    /// Starts an events (or all) node on free ports; returns it and its WebSocket/HTTP address.
    pub fn start_events(self) -> (Node, SocketAddr) {
        let (node, logs) = self.start_listening("127.0.0.1:0", "127.0.0.1:0");
        let http = events_http_addr(&logs);
        (node, http)
    }
}

/// The `http_addr` of the `events HTTP listening` log line.
pub fn events_http_addr(logs: &[serde_json::Value]) -> SocketAddr {
    logs.iter()
        .find(|v| v["message"] == "events HTTP listening")
        .and_then(|v| v["http_addr"].as_str())
        .expect("no 'events HTTP listening' line before ready")
        .parse()
        .expect("http_addr is an address")
}

/// A free TCP port on 127.0.0.1 (bound, then released), for a process that must come back on
/// the same address after a restart.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}
