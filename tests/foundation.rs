//! Foundation: the shared runtime as a user meets it, through real `peervault` processes on
//! 127.0.0.1 with generated certificates and real gRPC clients.

mod common;
#[path = "common/otlp.rs"]
mod otlp;

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::{Node, NodeBuilder, WAIT, try_channel};
use peervault_proto::v1::{
    PublishRequest, peer_vault_service_client::PeerVaultServiceClient, system_service_client::SystemServiceClient,
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

async fn health_of(ch: tonic::transport::Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(r.into_inner().status())
}

async fn list_services_v1(ch: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    match stream.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn list_services_v1alpha(ch: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    match stream.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test]
async fn serve_all_is_healthy_and_reflects_every_service() {
    let node = Node::start("all");
    let ch = node.channel().await;
    assert_eq!(health_of(ch.clone(), "").await.unwrap(), ServingStatus::Serving);
    for svc in ["peervault.v1.SystemService", "peervault.v1.PeerVaultService"] {
        assert_eq!(
            health_of(ch.clone(), svc).await.unwrap(),
            ServingStatus::Serving,
            "{svc}"
        );
    }
    let unknown = health_of(ch.clone(), "no.such.Service").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let mut expected = peervault_proto::service_names();
    assert!(expected.len() >= 9, "protocol lists {expected:?}");
    expected.push("grpc.health.v1.Health".into());
    for listed in [
        list_services_v1(ch.clone()).await,
        list_services_v1alpha(ch.clone()).await,
    ] {
        for name in &expected {
            assert!(listed.contains(name), "reflection lacks {name}: {listed:?}");
        }
    }
    let (code, body) = node.admin_get("/readyz");
    assert_eq!((code, body.trim()), (200, "ready"));
    assert_eq!(node.admin_get("/healthz").0, 200);
}

#[tokio::test]
async fn every_role_starts_and_serves_system_service() {
    for role in ["blob", "peer", "events"] {
        let node = Node::start(role);
        let ch = node.channel().await;
        assert_eq!(
            health_of(ch.clone(), "").await.unwrap(),
            ServingStatus::Serving,
            "{role}"
        );
        let info = SystemServiceClient::new(ch)
            .get_system_info(())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.role, role);
        // PeerVaultService lives on blob; other roles answer UNIMPLEMENTED, after authentication.
        let r = PeerVaultServiceClient::new(node.channel().await)
            .list_files(peervault_proto::v1::ListFilesRequest::default())
            .await;
        match role {
            "blob" => assert!(r.is_ok(), "{r:?}"),
            _ => assert_eq!(r.unwrap_err().code(), Code::Unimplemented, "{role}"),
        }
    }
}

#[tokio::test]
async fn system_service_reports_real_figures() {
    // The request count is checked exactly, so the node's own periodic calls to itself (peer
    // health probes, metrics events published to the events service, anti-entropy rounds) are pushed out of the
    // test's window.
    let node = NodeBuilder::new("all")
        .arg("--probe-interval")
        .arg("1h")
        .arg("--metrics-interval")
        .arg("1h")
        .arg("--anti-entropy-interval")
        .arg("1h")
        .start();
    let mut c = SystemServiceClient::new(node.channel().await);
    let info = c.get_system_info(()).await.unwrap().into_inner();
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.role, "all");
    let start = info.start_time.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now - 60..=now).contains(&start.seconds),
        "start_time {start:?} vs now {now}"
    );
    assert!(info.uptime_seconds >= 0 && info.uptime_seconds < 60);

    // The node's own start-up calls (the membership watch, the start-up event published to the
    // events service) may land late on a loaded machine: wait for them before the window.
    for method in ["WatchMembership", "Publish"] {
        let label = format!("grpc_method=\"{method}\"");
        node.wait_metric("grpc_server_started_total", &[label.as_str()], |v| v >= 1.0);
    }
    let before = c.get_metrics(()).await.unwrap().into_inner();
    for _ in 0..5 {
        c.get_system_info(()).await.unwrap();
    }
    let after = c.get_metrics(()).await.unwrap().into_inner();
    // Five GetSystemInfo calls plus the GetMetrics call itself.
    assert_eq!(
        after.requests_total - before.requests_total,
        6,
        "{before:?} -> {after:?}"
    );
    assert!(after.requests_per_minute >= 8.0, "{after:?}");
    assert!(after.active_connections >= 1, "{after:?}");
    assert!(after.last_updated.is_some());

    let health = c.health_check(()).await.unwrap().into_inner();
    assert_eq!(health.status, "SERVING");
    assert_eq!(
        health.services.get("peervault.v1.SystemService").map(String::as_str),
        Some("SERVING")
    );

    // PeerVaultService answers system calls with the same code.
    let pv = PeerVaultServiceClient::new(node.channel().await)
        .get_system_info(())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pv.start_time, info.start_time);
}

#[tokio::test]
async fn clients_without_a_trusted_certificate_are_refused() {
    let node = Node::start("all");
    let tls = node.tls_dir();
    let ca = tls.join("ca.crt");

    // No client certificate: the handshake is refused.
    let no_cert = match try_channel(node.grpc, Some(&ca), None).await {
        Err(_) => true,
        Ok(ch) => SystemServiceClient::new(ch).get_system_info(()).await.is_err(),
    };
    assert!(no_cert, "a client without a certificate got through");

    // A certificate from another CA.
    let other = tempfile::tempdir().unwrap();
    let issuer = peervault_runtime::tls::CaIssuer::generate("Some other CA").unwrap();
    let (cert, key) = issuer
        .leaf(
            "intruder",
            vec![rcgen::SanType::URI(
                "spiffe://peervault.local/peervault/blob".try_into().unwrap(),
            )],
        )
        .unwrap();
    std::fs::write(other.path().join("c.crt"), cert).unwrap();
    std::fs::write(other.path().join("c.key"), key).unwrap();
    let other_ca = match try_channel(
        node.grpc,
        Some(&ca),
        Some((&other.path().join("c.crt"), &other.path().join("c.key"))),
    )
    .await
    {
        Err(_) => true,
        Ok(ch) => SystemServiceClient::new(ch).get_system_info(()).await.is_err(),
    };
    assert!(other_ca, "a certificate from another CA got through");

    // Both refusals are visible to the operator.
    node.wait_metric(
        "peervault_tls_handshake_failures_total",
        &["no_client_certificate"],
        |v| v >= 1.0,
    );
    node.wait_metric(
        "peervault_tls_handshake_failures_total",
        &["untrusted_client_certificate"],
        |v| v >= 1.0,
    );
}

#[tokio::test]
async fn internal_rpcs_need_a_service_identity() {
    let node = Node::start("all");
    let client = node.channel().await;
    let service = node.service_channel().await;

    use peervault_proto::v1::{
        HasChunksRequest, WatchMembershipRequest, event_service_client::EventServiceClient,
        peer_service_client::PeerServiceClient, replication_service_client::ReplicationServiceClient,
    };
    let st = EventServiceClient::new(client.clone())
        .publish(PublishRequest::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("service identities"), "{}", st.message());
    let st = PeerServiceClient::new(client.clone())
        .watch_membership(WatchMembershipRequest::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    let st = ReplicationServiceClient::new(client.clone())
        .has_chunks(HasChunksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);

    // A service identity passes the auth layer and reaches the events service.
    let accepted = EventServiceClient::new(service.clone())
        .publish(PublishRequest::default())
        .await
        .expect("a service identity may publish")
        .into_inner()
        .accepted;
    assert_eq!(accepted, 0);
    node.wait_metric("peervault_auth_failures_total", &["not_a_service"], |v| v >= 3.0);
}

#[tokio::test]
async fn optional_client_auth_admits_health_but_not_calls() {
    let node = NodeBuilder::new("all").arg("--tls-client-auth").arg("optional").start();
    let ch = try_channel(node.grpc, Some(&node.tls_dir().join("ca.crt")), None)
        .await
        .unwrap();
    assert_eq!(health_of(ch.clone(), "").await.unwrap(), ServingStatus::Serving);
    assert!(!list_services_v1(ch.clone()).await.is_empty());
    let st = SystemServiceClient::new(ch).get_system_info(()).await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    // The dev client certificate still works.
    SystemServiceClient::new(node.channel().await)
        .get_system_info(())
        .await
        .unwrap();
}

#[tokio::test]
async fn metrics_show_grpc_counters_moving() {
    let node = Node::start("all");
    let mut c = SystemServiceClient::new(node.channel().await);
    let m = "grpc_method=\"GetSystemInfo\"";
    let s = "grpc_service=\"peervault.v1.SystemService\"";
    let base = |name: &str| node.metric(name, &[s, m]).unwrap_or(0.0);
    let (started0, received0, sent0) = (
        base("grpc_server_started_total"),
        base("grpc_server_msg_received_total"),
        base("grpc_server_msg_sent_total"),
    );
    for _ in 0..7 {
        c.get_system_info(()).await.unwrap();
    }
    let ok = node.wait_metric(
        "grpc_server_handled_total",
        &[s, m, "grpc_code=\"OK\"", "grpc_type=\"unary\""],
        |v| v >= 7.0,
    );
    assert_eq!(ok, 7.0);
    assert_eq!(base("grpc_server_started_total") - started0, 7.0);
    assert_eq!(base("grpc_server_msg_received_total") - received0, 7.0);
    assert_eq!(base("grpc_server_msg_sent_total") - sent0, 7.0);
    assert_eq!(node.metric("grpc_server_handling_seconds_count", &[s, m]), Some(7.0));

    // Refusals are counted with their code.
    let _ = peervault_proto::v1::event_service_client::EventServiceClient::new(node.channel().await)
        .publish(PublishRequest::default())
        .await;
    node.wait_metric(
        "grpc_server_handled_total",
        &["grpc_method=\"Publish\"", "grpc_code=\"PermissionDenied\""],
        |v| v >= 1.0,
    );
    assert!(node.metric("process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert_eq!(node.metric("peervault_ready", &[]), Some(1.0));
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_stream_finish_then_exits_zero() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let mut node = NodeBuilder::new("all").arg("--shutdown-grace").arg("20s").start();
    let ch = node.channel().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let req = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    tx.send(req()).await.unwrap();
    let mut stream = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());

    node.signal("TERM");
    // Readiness drops as soon as the drain starts.
    node.wait_log(WAIT, |v| {
        v["message"] == "shutdown requested: refusing new connections, draining in-flight calls"
    });
    assert_eq!(node.admin_get("/readyz").0, 503);

    // The open stream keeps working during the drain.
    tx.send(req()).await.unwrap();
    assert!(stream.message().await.unwrap().is_some(), "in-flight stream was cut");
    // New connections are refused once draining.
    assert!(
        try_channel(node.grpc, Some(&node.tls_dir().join("ca.crt")), None)
            .await
            .is_err()
    );
    drop(tx);
    assert!(stream.message().await.unwrap().is_none());
    let status = node.wait_exit(WAIT);
    assert!(status.success(), "exit status {status:?}");
    node.wait_log(WAIT, |v| v["message"] == "all calls drained");
}

/// Handshakes with rustls directly and returns the certificate the server presented.
async fn presented_certificate(node: &Node, ca_pem: &[u8], client: (&[u8], &[u8])) -> Result<Vec<u8>, String> {
    use rustls::pki_types::ServerName;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let certs = rustls_pemfile::certs(&mut &client.0[..]).map(|c| c.unwrap()).collect();
    let key = rustls_pemfile::private_key(&mut &client.1[..]).unwrap().unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(node.grpc)
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(conn.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

#[tokio::test]
async fn a_certificate_replaced_on_disk_is_served_without_restart() {
    let node = NodeBuilder::new("all")
        .arg("--tls-reload-interval")
        .arg("100ms")
        .start();
    let tls = node.tls_dir();
    let read = |f: &str| std::fs::read(tls.join(f)).unwrap();
    let der = |pem: &[u8]| rustls_pemfile::certs(&mut &pem[..]).next().unwrap().unwrap().to_vec();
    let old = presented_certificate(&node, &read("ca.crt"), (&read("client.crt"), &read("client.key")))
        .await
        .unwrap();
    assert_eq!(old, der(&read("server.crt")));

    // Rotate everything, as cert-manager would on a CA change: new CA, server and client certs.
    let set = peervault_runtime::tls::DevCertSet::generate("peervault.local", &["localhost".into()]).unwrap();
    std::fs::write(tls.join("server.key"), &set.server_key_pem).unwrap();
    std::fs::write(tls.join("server.crt"), &set.server_cert_pem).unwrap();
    std::fs::write(tls.join("ca.crt"), &set.ca_pem).unwrap();
    node.wait_metric("peervault_tls_reloads_total", &["result=\"ok\""], |v| v >= 1.0);
    node.wait_log(WAIT, |v| v["message"] == "TLS certificate reloaded from disk");

    let new = presented_certificate(
        &node,
        set.ca_pem.as_bytes(),
        (set.client_cert_pem.as_bytes(), set.client_key_pem.as_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(new, der(set.server_cert_pem.as_bytes()));
    assert_ne!(new, old);
    // The old client certificate's CA is no longer trusted: a call presenting it fails (under
    // TLS 1.3 the refusal may surface at the first request rather than in the handshake).
    let old_client = common::try_channel(
        node.grpc,
        Some(&tls.join("ca.crt")),
        Some((&tls.join("client.crt"), &tls.join("client.key"))),
    )
    .await;
    if let Ok(ch) = old_client {
        assert!(SystemServiceClient::new(ch).get_system_info(()).await.is_err());
    }
    // A client certificate of the new CA is accepted for calls.
    let newdir = tempfile::tempdir().unwrap();
    std::fs::write(newdir.path().join("c.crt"), &set.client_cert_pem).unwrap();
    std::fs::write(newdir.path().join("c.key"), &set.client_key_pem).unwrap();
    let ch = common::channel_with(
        node.grpc,
        Some(&tls.join("ca.crt")),
        Some((&newdir.path().join("c.crt"), &newdir.path().join("c.key"))),
    )
    .await;
    SystemServiceClient::new(ch).get_system_info(()).await.unwrap();
}

#[tokio::test]
async fn bad_configuration_exits_non_zero_naming_the_problem() {
    let run = |args: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(common::peervault_bin())
            .args(["serve", "all", "--data-dir"])
            .arg(dir.path().join("data"))
            // Defaults through the environment; flags given by a case override them.
            .env("PEERVAULT_GRPC_LISTEN", "127.0.0.1:0")
            .env("PEERVAULT_ADMIN_LISTEN", "127.0.0.1:0")
            .args(args)
            .output()
            .unwrap();
        (out.status, String::from_utf8_lossy(&out.stderr).to_string())
    };

    let (st, err) = run(&[
        "--tls-cert",
        "/nonexistent/server.crt",
        "--tls-key",
        "/nonexistent/server.key",
        "--tls-client-ca",
        "/nonexistent/ca.crt",
    ]);
    assert!(!st.success());
    assert!(
        err.contains("--tls-cert") && err.contains("/nonexistent/server.crt"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let g = garbage.to_str().unwrap();
    let (st, err) = run(&["--tls-cert", g, "--tls-key", g, "--tls-client-ca", g]);
    assert!(!st.success());
    assert!(
        err.contains("invalid --tls-cert") && err.contains("no PEM CERTIFICATE"),
        "{err}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (st, err) = run(&["--grpc-listen", &addr]);
    assert!(!st.success());
    assert!(
        err.contains("--grpc-listen") && err.contains(&addr) && err.contains("in use"),
        "{err}"
    );

    let (st, err) = run(&["--admin-listen", "not-an-address"]);
    assert!(!st.success());
    assert!(
        err.contains("--admin-listen") && err.contains("not-an-address"),
        "{err}"
    );

    let (st, err) = run(&["--grpc-listen", "10.255.255.1:0"]);
    assert!(!st.success());
    assert!(
        err.contains("--grpc-listen") && err.contains("no such address"),
        "{err}"
    );

    let (st, err) = run(&["--tls-client-auth", "sometimes"]);
    assert!(!st.success());
    assert!(err.contains("--tls-client-auth"), "{err}");
}

#[tokio::test]
async fn forwarded_calls_reach_the_peer_service_with_service_identity() {
    // serve all forwards PeerVaultService peer calls to its own PeerService over mTLS with the
    // service certificate.
    let node = Node::start("all");
    PeerVaultServiceClient::new(node.channel().await)
        .list_peers(())
        .await
        .unwrap();
    node.wait_metric(
        "grpc_server_handled_total",
        &[
            "grpc_service=\"peervault.v1.PeerService\"",
            "grpc_method=\"ListPeers\"",
            "grpc_code=\"OK\"",
        ],
        |v| v >= 1.0,
    );

    // A blob node with no peer service configured says what to do.
    let blob = Node::start("blob");
    let st = PeerVaultServiceClient::new(blob.channel().await)
        .list_peers(())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    assert!(st.message().contains("--peer-endpoint"), "{}", st.message());
}

#[tokio::test]
async fn a_call_crossing_two_services_is_one_trace() {
    let (receiver, otlp_addr) = otlp::start().await;
    let endpoint = format!("http://{otlp_addr}");
    let peer = NodeBuilder::new("peer")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start();
    // The blob node trusts the peer node: it starts from a copy of the same tls/ folder.
    let blob_dir = tempfile::tempdir().unwrap();
    let data = blob_dir.path().join("data");
    std::fs::create_dir_all(data.join("tls")).unwrap();
    for f in ["ca.crt", "server.crt", "server.key", "client.crt", "client.key"] {
        std::fs::copy(peer.tls_dir().join(f), data.join("tls").join(f)).unwrap();
    }
    let blob = NodeBuilder::new("blob")
        .data_dir(&data)
        .arg("--peer-endpoint")
        .arg(format!("localhost:{}", peer.grpc.port()))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start();

    // The call must reach the peer service and come back.
    PeerVaultServiceClient::new(blob.channel().await)
        .list_peers(())
        .await
        .unwrap();

    let find = |spans: &[(String, opentelemetry_proto::tonic::trace::v1::Span)], svc: &str, name: &str, kind: i32| {
        spans
            .iter()
            .find(|(s, sp)| s == svc && sp.name == name && sp.kind == kind)
            .map(|(_, sp)| sp.clone())
    };
    const SERVER: i32 = 2;
    const CLIENT: i32 = 3;
    let deadline = std::time::Instant::now() + WAIT;
    let (blob_server, blob_client, peer_server) = loop {
        {
            let spans = receiver.spans.lock().await;
            let a = find(
                &spans,
                "peervault-blob",
                "peervault.v1.PeerVaultService/ListPeers",
                SERVER,
            );
            let b = find(&spans, "peervault-blob", "peervault.v1.PeerService/ListPeers", CLIENT);
            let c = find(&spans, "peervault-peer", "peervault.v1.PeerService/ListPeers", SERVER);
            if let (Some(a), Some(b), Some(c)) = (a, b, c) {
                break (a, b, c);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "spans never arrived: {:?}",
                spans.iter().map(|(s, sp)| (s, &sp.name)).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(blob_client.trace_id, blob_server.trace_id);
    assert_eq!(
        peer_server.trace_id, blob_server.trace_id,
        "peer's span is in another trace"
    );
    assert_eq!(blob_client.parent_span_id, blob_server.span_id);
    assert_eq!(
        peer_server.parent_span_id, blob_client.span_id,
        "peer's span has the wrong parent"
    );
    let attrs: HashMap<_, _> = peer_server
        .attributes
        .iter()
        .map(|kv| (kv.key.clone(), format!("{:?}", kv.value)))
        .collect();
    assert!(
        attrs.get("rpc.grpc.status_code").is_some_and(|v| v.contains("\"0\"")),
        "{attrs:?}"
    );
}

#[tokio::test]
async fn clients_of_the_published_package_name_are_served() {
    // Clients generated from the published proto call `/peervault.PeerVaultService/...`.
    let node = Node::start("all");
    let mut grpc = tonic::client::Grpc::new(node.channel().await);
    grpc.ready().await.unwrap();
    let resp: tonic::Response<peervault_proto::v1::SystemInfoResponse> = grpc
        .unary(
            tonic::Request::new(()),
            http::uri::PathAndQuery::from_static("/peervault.PeerVaultService/GetSystemInfo"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap();
    assert_eq!(resp.into_inner().version, env!("CARGO_PKG_VERSION"));
}
