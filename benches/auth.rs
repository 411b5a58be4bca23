//! Auth overhead benchmark (`cargo bench --bench auth`): calls/s of a trivial RPC
//! (SystemService.GetSystemInfo) with 32 concurrent calls on one channel, authenticated by the
//! client certificate alone, by an API key, and by an HS256 JWT. Prints one JSON document.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use peervault_proto::v1::{
    CreateApiKeyRequest, auth_service_client::AuthServiceClient, system_service_client::SystemServiceClient,
};
use tonic::{
    Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

#[derive(Clone)]
struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

async fn channel(addr: SocketAddr, tls: &Path, with_cert: bool) -> Channel {
    let read = |f: &str| std::fs::read(tls.join(f)).expect("tls file");
    let mut cfg = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(read("ca.crt")));
    if with_cert {
        cfg = cfg.identity(Identity::from_pem(read("client.crt"), read("client.key")));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(cfg)
        .expect("tls")
        .connect()
        .await
        .expect("connect")
}

async fn run(ch: Channel, token: Option<String>, calls: usize) -> f64 {
    let svc = InterceptedService::new(
        ch,
        Bearer(token.map(|t| format!("Bearer {t}").parse().expect("header"))),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (svc, next) = (svc.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = SystemServiceClient::new(svc);
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                c.get_system_info(()).await.expect("call");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    calls as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let calls: usize = std::env::var("PV_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    let work = tempfile::tempdir().expect("tempdir");
    let secret = [b'k'; 32];
    std::fs::write(work.path().join("jwt.secret"), secret).expect("secret");
    std::fs::write(work.path().join("auth.yaml"), "subjects:\n  bench: [read]\n").expect("auth config");
    let data = work.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_peervault"))
        .args(["serve", "all", "--tls-client-auth", "optional", "--data-dir"])
        .arg(&data)
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--log-format", "json", "--log", "warn,peervault_runtime=info"])
        .arg("--jwt-hs256-secret-file")
        .arg(work.path().join("jwt.secret"))
        .arg("--auth-config")
        .arg(work.path().join("auth.yaml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start peervault");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr: SocketAddr = loop {
        let line = lines.next().expect("server exited").expect("read");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "peervault ready" {
            break v["grpc_addr"].as_str().expect("addr").parse().expect("addr");
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let tls = data.join("tls");
    let admin = channel(addr, &tls, true).await;
    let key = AuthServiceClient::new(admin.clone())
        .create_api_key(CreateApiKeyRequest {
            name: "bench".into(),
            scopes: vec!["read".into()],
            ..Default::default()
        })
        .await
        .expect("create key")
        .into_inner()
        .secret;
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "bench", "exp": jsonwebtoken::get_current_timestamp() + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(&secret),
    )
    .expect("jwt");
    // Warm up each path once, then measure.
    run(admin.clone(), None, 1000).await;
    let cert = run(admin.clone(), None, calls).await;
    let tokens = channel(addr, &tls, false).await;
    run(tokens.clone(), Some(key.clone()), 1000).await;
    let api_key = run(tokens.clone(), Some(key), calls).await;
    let jwt_rate = run(tokens, Some(jwt), calls).await;
    let report = serde_json::json!({
        "rpc": "SystemService.GetSystemInfo",
        "concurrency": 32,
        "calls": calls,
        "client_certificate_calls_per_sec": cert,
        "api_key_calls_per_sec": api_key,
        "jwt_hs256_calls_per_sec": jwt_rate,
        "api_key_overhead_pct": (cert - api_key) / cert * 100.0,
        "jwt_overhead_pct": (cert - jwt_rate) / cert * 100.0,
    });
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    let _ = child.kill();
    let _ = child.wait();
}
