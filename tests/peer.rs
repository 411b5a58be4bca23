//! The peer service with real processes on 127.0.0.1: static and DNS discovery of real `serve
//! blob` nodes, health probing (SIGSTOP/SIGCONT), peer events, AddPeer/RemovePeer persistence,
//! bad input, and the blob side's WatchMembership subscription surviving a peer-service outage.

mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Node, NodeBuilder, WAIT};
use peervault_proto::v1::{
    AddPeerRequest, Event, MembershipUpdateKind, PeerRequest, PublishRequest, PublishResponse, WatchMembershipRequest,
    event::Payload,
    event_service_server::{EventService, EventServiceServer},
    peer_service_client::PeerServiceClient,
};
use tonic::{Code, transport::Channel};

// The tests run in-process servers (a TCP proxy, an EventService recorder, a DNS server) while
// the harness's waits block their thread, hence multi-threaded runtimes.

const TLS_FILES: [&str; 5] = ["ca.crt", "server.crt", "server.key", "client.crt", "client.key"];

/// One development CA and certificate set, copied into every node's data dir so that they all
/// trust each other.
struct Cluster {
    tls: tempfile::TempDir,
    dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    fn new() -> Self {
        let tls = tempfile::tempdir().unwrap();
        peervault_runtime::tls::ensure_dev_certs(tls.path(), "peervault.local").unwrap();
        Cluster { tls, dirs: vec![] }
    }

    fn tls_file(&self, f: &str) -> PathBuf {
        self.tls.path().join(f)
    }

    /// A fresh data dir holding the shared certificates.
    fn data_dir(&mut self) -> PathBuf {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(data.join("tls")).unwrap();
        for f in TLS_FILES {
            std::fs::copy(self.tls.path().join(f), data.join("tls").join(f)).unwrap();
        }
        self.dirs.push(t);
        data
    }

    fn node(&mut self, role: &str, args: &[String]) -> Node {
        let dir = self.data_dir();
        start_in(role, &dir, args)
    }
}

fn start_in(role: &str, dir: &Path, args: &[String]) -> Node {
    let mut b = NodeBuilder::new(role).data_dir(dir);
    for a in args {
        b = b.arg(a.clone());
    }
    b.start()
}

fn s(v: &str) -> String {
    v.to_string()
}

async fn peers(node: &Node) -> PeerServiceClient<Channel> {
    PeerServiceClient::new(node.channel().await)
}

/// Polls `f` every 20 ms until it returns Some, for at most `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (id, status) of every peer ListPeers returns.
async fn statuses(client: &mut PeerServiceClient<Channel>) -> BTreeMap<String, String> {
    client
        .list_peers(())
        .await
        .unwrap()
        .into_inner()
        .peers
        .into_iter()
        .map(|p| (p.id, p.status))
        .collect()
}

async fn wait_statuses(client: &mut PeerServiceClient<Channel>, want: &BTreeMap<String, String>) {
    let mut last = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let got = statuses(client).await;
        if &got == want {
            return;
        }
        if got != last {
            last = got;
        }
        assert!(Instant::now() < deadline, "peers never became {want:?}; last {last:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn all(ids: &[String], status: &str) -> BTreeMap<String, String> {
    ids.iter().map(|i| (i.clone(), status.to_string())).collect()
}

/// A real EventService endpoint (mutual TLS with the shared certificates) that keeps what the
/// peer service publishes.
#[derive(Clone, Default)]
struct EventRecorder {
    events: Arc<Mutex<Vec<Event>>>,
}

#[tonic::async_trait]
impl EventService for EventRecorder {
    async fn publish(
        &self,
        request: tonic::Request<PublishRequest>,
    ) -> Result<tonic::Response<PublishResponse>, tonic::Status> {
        let events = request.into_inner().events;
        let n = events.len() as u32;
        self.events.lock().unwrap().extend(events);
        Ok(tonic::Response::new(PublishResponse { accepted: n }))
    }
}

impl EventRecorder {
    async fn start(cluster: &Cluster) -> (EventRecorder, SocketAddr) {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let rec = EventRecorder::default();
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                std::fs::read(cluster.tls_file("server.crt")).unwrap(),
                std::fs::read(cluster.tls_file("server.key")).unwrap(),
            ))
            .client_ca_root(Certificate::from_pem(
                std::fs::read(cluster.tls_file("ca.crt")).unwrap(),
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = EventServiceServer::new(rec.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (rec, addr)
    }

    /// Waits for an event of `kind` about `peer` (and with metadata `status` when given).
    async fn wait(&self, kind: &str, peer: &str, status: Option<&str>) -> Event {
        wait_for(&format!("event {kind} for {peer} {status:?}"), WAIT, || async {
            self.events
                .lock()
                .unwrap()
                .iter()
                .find(|e| {
                    let Some(Payload::Peer(p)) = &e.payload else {
                        return false;
                    };
                    e.topic == "peer_network"
                        && e.r#type == kind
                        && p.peer_id == peer
                        && status.is_none_or(|s| p.metadata.get("status").map(String::as_str) == Some(s))
                })
                .cloned()
        })
        .await
    }
}

/// A TCP forwarder owned by the test: blob nodes dial it as their peer service, and the test
/// points it at whichever peer-service process is current (none while it is down).
struct Proxy {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let t = target.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let to = *t.lock().unwrap();
                tokio::spawn(async move {
                    let Some(to) = to else { return };
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Proxy { addr, target }
    }

    fn point_at(&self, to: Option<SocketAddr>) {
        *self.target.lock().unwrap() = to;
    }
}

fn probe_flags() -> Vec<String> {
    [
        "--probe-interval",
        "200ms",
        "--probe-timeout",
        "300ms",
        "--probe-down-after",
        "3",
        "--probe-up-after",
        "2",
    ]
    .map(s)
    .to_vec()
}

/// Longest time the flags above allow from a stop to `down` (HealthPolicy::detection_time).
const DETECTION_TIME: Duration = Duration::from_millis(1200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_peers_are_probed_a_stopped_one_goes_down_and_blob_keeps_its_view() {
    let mut cluster = Cluster::new();
    let (recorder, events_addr) = EventRecorder::start(&cluster).await;
    let proxy = Proxy::start().await;
    let peer_via_proxy = format!("127.0.0.1:{}", proxy.addr.port());
    let blobs: Vec<Node> = (0..3)
        .map(|i| {
            cluster.node(
                "blob",
                &[
                    s("--peer-endpoint"),
                    peer_via_proxy.clone(),
                    s("--node-id"),
                    format!("blob-{i}"),
                ],
            )
        })
        .collect();
    let ids: Vec<String> = blobs.iter().map(|b| format!("127.0.0.1:{}", b.grpc.port())).collect();
    let peer_dir = cluster.data_dir();
    let mut args = vec![
        s("--discovery"),
        s("static"),
        s("--peers"),
        ids.join(","),
        s("--events-endpoint"),
        events_addr.to_string(),
    ];
    args.extend(probe_flags());
    let peer = start_in("peer", &peer_dir, &args);
    proxy.point_at(Some(peer.grpc));
    let mut client = peers(&peer).await;

    // ListPeers shows the three blob nodes healthy, with the published fields filled in.
    wait_statuses(&mut client, &all(&ids, "healthy")).await;
    let listed = client.list_peers(()).await.unwrap().into_inner();
    assert_eq!(listed.total, 3);
    for p in &listed.peers {
        assert_eq!(p.address, "127.0.0.1");
        assert!(p.last_seen.is_some() && p.created_at.is_some() && p.ready, "{p:?}");
    }
    for id in &ids {
        recorder.wait("peer_connected", id, None).await;
    }
    peer.wait_metric("peervault_peer_up", &[&format!("peer=\"{}\"", ids[1])], |v| v == 1.0);
    peer.wait_metric("peervault_peer_membership_size", &[], |v| v == 3.0);
    // Every blob node has the view through WatchMembership.
    for b in &blobs {
        b.wait_metric("peervault_membership_view_ready", &[], |v| v == 3.0);
        b.wait_metric("peervault_membership_connected", &[], |v| v == 1.0);
    }

    // SIGSTOP one: it is `down` within the detection time, with events, and the blob nodes see
    // it not ready.
    let stopped = &blobs[1];
    stopped.signal("STOP");
    let t0 = Instant::now();
    let req = || PeerRequest { id: ids[1].clone() };
    wait_for("stopped peer down", WAIT, || {
        let mut c = client.clone();
        async move {
            let h = c.get_peer_health(req()).await.unwrap().into_inner();
            (h.status == "down").then_some(h)
        }
    })
    .await;
    let detected = t0.elapsed();
    println!(
        "{{\"measure\":\"detection_time_ms\",\"value\":{},\"bound_ms\":{},\"probe_interval_ms\":200,\"probe_timeout_ms\":300,\"down_after\":3}}",
        detected.as_millis(),
        DETECTION_TIME.as_millis()
    );
    assert!(
        detected <= DETECTION_TIME + Duration::from_millis(800),
        "down after {detected:?}, configured detection time {DETECTION_TIME:?}"
    );
    let h = client.get_peer_health(req()).await.unwrap().into_inner();
    assert!(h.consecutive_failures >= 3, "{h:?}");
    assert_eq!(h.uptime_seconds, 0);
    assert!(h.metrics.contains_key("last_error"), "{h:?}");
    let others = [ids[0].clone(), ids[2].clone()];
    let mut want = all(&others, "healthy");
    want.insert(ids[1].clone(), "down".into());
    assert_eq!(statuses(&mut client).await, want);
    recorder.wait("peer_health_changed", &ids[1], Some("down")).await;
    recorder.wait("peer_disconnected", &ids[1], None).await;
    peer.wait_metric("peervault_peer_up", &[&format!("peer=\"{}\"", ids[1])], |v| v == 0.0);
    blobs[0].wait_metric("peervault_membership_view_ready", &[], |v| v == 2.0);
    blobs[0].wait_metric("peervault_membership_view_size", &[], |v| v == 3.0);

    // SIGCONT: healthy again, with events.
    stopped.signal("CONT");
    wait_statuses(&mut client, &all(&ids, "healthy")).await;
    recorder.wait("peer_health_changed", &ids[1], Some("healthy")).await;
    let connected = recorder
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.r#type == "peer_connected" && matches!(&e.payload, Some(Payload::Peer(p)) if p.peer_id == ids[1]))
        .count();
    assert!(connected >= 1);
    wait_for("a second peer_connected", WAIT, || async {
        let n = recorder
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| {
                e.r#type == "peer_connected" && matches!(&e.payload, Some(Payload::Peer(p)) if p.peer_id == ids[1])
            })
            .count();
        (n >= 2).then_some(())
    })
    .await;
    blobs[0].wait_metric("peervault_membership_view_ready", &[], |v| v == 3.0);
    let version_before = blobs[0].metric("peervault_membership_view_version", &[]).unwrap();

    // The peer service goes away: blob nodes keep their last view and keep serving.
    proxy.point_at(None);
    drop(peer);
    blobs[0].wait_log(WAIT, |v| {
        v["message"] == "membership stream lost; keeping the last view"
    });
    blobs[0].wait_metric("peervault_membership_connected", &[], |v| v == 0.0);
    assert_eq!(blobs[0].metric("peervault_membership_view_size", &[]), Some(3.0));
    assert_eq!(blobs[0].metric("peervault_membership_view_ready", &[]), Some(3.0));
    let health = tonic_health::pb::health_client::HealthClient::new(blobs[0].channel().await)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // It comes back (same data dir, now listing two blob nodes): the blob nodes catch up.
    let mut args = vec![
        s("--discovery"),
        s("static"),
        s("--peers"),
        ids[..2].join(","),
        s("--events-endpoint"),
        events_addr.to_string(),
    ];
    args.extend(probe_flags());
    let peer = start_in("peer", &peer_dir, &args);
    proxy.point_at(Some(peer.grpc));
    for b in &blobs {
        b.wait_metric("peervault_membership_connected", &[], |v| v == 1.0);
        b.wait_metric("peervault_membership_view_size", &[], |v| v == 2.0);
        b.wait_metric("peervault_membership_view_ready", &[], |v| v == 2.0);
    }
    let version_after = blobs[0].metric("peervault_membership_view_version", &[]).unwrap();
    assert!(version_after > version_before, "{version_after} > {version_before}");
    let mut client = peers(&peer).await;
    wait_statuses(&mut client, &all(&ids[..2], "healthy")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_and_removed_peers_survive_a_restart_and_bad_input_is_refused() {
    let mut cluster = Cluster::new();
    let blob_a = cluster.node("blob", &[]);
    let blob_b = cluster.node("blob", &[]);
    let static_id = format!("127.0.0.1:{}", blob_a.grpc.port());
    let peer_dir = cluster.data_dir();
    let mut args = vec![s("--peers"), static_id.clone()];
    args.extend(probe_flags());
    let peer = start_in("peer", &peer_dir, &args);
    let mut client = peers(&peer).await;
    wait_statuses(&mut client, &all(std::slice::from_ref(&static_id), "healthy")).await;

    // AddPeer by address and port, with an id and metadata.
    let added = client
        .add_peer(AddPeerRequest {
            address: "localhost".into(),
            port: i32::from(blob_b.grpc.port()),
            metadata: [("zone".to_string(), "zone-b".to_string())].into(),
            id: "blob-b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(added.id, "blob-b");
    assert_eq!(added.address, "localhost");
    assert_eq!(added.zone, "zone-b");
    assert_eq!(added.metadata.get("zone").map(String::as_str), Some("zone-b"));
    assert!(added.created_at.is_some());
    let both = all(&[static_id.clone(), s("blob-b")], "healthy");
    wait_statuses(&mut client, &both).await;

    // Bad input.
    let add = |address: &str, port: i32, id: &str| AddPeerRequest {
        address: address.into(),
        port,
        metadata: Default::default(),
        id: id.into(),
    };
    let mut c = client.clone();
    let mut code = async move |r: AddPeerRequest| c.add_peer(r).await.unwrap_err();
    for (req, want) in [
        (add("", 8082, ""), Code::InvalidArgument),
        (add("   ", 8082, ""), Code::InvalidArgument),
        (add("not a host name", 8082, ""), Code::InvalidArgument),
        (add("host", 70000, ""), Code::InvalidArgument),
        (add("host", 0, ""), Code::InvalidArgument),
        (add("host:notaport", 0, ""), Code::InvalidArgument),
        (add("host", 1, "bad id!"), Code::InvalidArgument),
        (add("10.9.9.9", 1, "blob-b"), Code::AlreadyExists),
        (
            add("localhost", i32::from(blob_b.grpc.port()), "other"),
            Code::AlreadyExists,
        ),
        (add(&static_id, 0, ""), Code::AlreadyExists),
    ] {
        let st = code(req.clone()).await;
        assert_eq!(st.code(), want, "{req:?}: {st:?}");
        assert!(!st.message().is_empty());
    }
    for (st, want) in [
        (
            client.get_peer(PeerRequest { id: "nope".into() }).await.unwrap_err(),
            Code::NotFound,
        ),
        (
            client.remove_peer(PeerRequest { id: "nope".into() }).await.unwrap_err(),
            Code::NotFound,
        ),
        (
            client
                .get_peer_health(PeerRequest { id: "nope".into() })
                .await
                .unwrap_err(),
            Code::NotFound,
        ),
        (
            client.get_peer(PeerRequest { id: "".into() }).await.unwrap_err(),
            Code::InvalidArgument,
        ),
        (
            client.remove_peer(PeerRequest { id: "".into() }).await.unwrap_err(),
            Code::InvalidArgument,
        ),
    ] {
        assert_eq!(st.code(), want, "{st:?}");
    }
    // WatchMembership is internal: a client certificate is refused by the auth layer; a service
    // identity must name itself.
    let st = client
        .watch_membership(WatchMembershipRequest {
            since_version: 0,
            watcher_id: "me".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    let mut svc = PeerServiceClient::new(peer.service_channel().await);
    let st = svc
        .watch_membership(WatchMembershipRequest {
            since_version: 0,
            watcher_id: "".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    let mut stream = svc
        .watch_membership(WatchMembershipRequest {
            since_version: 0,
            watcher_id: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.kind, MembershipUpdateKind::Snapshot as i32);
    assert_eq!(first.members.len(), 2);
    drop(stream);

    // RemovePeer of the static peer excludes it although the static list still names it.
    let r = client
        .remove_peer(PeerRequest { id: static_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(r.success && r.message.contains("removed"), "{r:?}");
    wait_statuses(&mut client, &all(&[s("blob-b")], "healthy")).await;

    // Restart: the added peer is still there and the removed one still excluded.
    drop(client);
    drop(svc);
    drop(peer);
    let stored = std::fs::read_to_string(peer_dir.join("peer").join("peers.json")).unwrap();
    assert!(stored.contains("blob-b") && stored.contains(&static_id), "{stored}");
    let peer = start_in("peer", &peer_dir, &args);
    let mut client = peers(&peer).await;
    wait_statuses(&mut client, &all(&[s("blob-b")], "healthy")).await;
    let p = client
        .get_peer(PeerRequest { id: "blob-b".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.zone, "zone-b");

    // Adding the removed peer includes it again; removing the added one persists too.
    client.add_peer(add(&static_id, 0, "")).await.unwrap();
    client.remove_peer(PeerRequest { id: "blob-b".into() }).await.unwrap();
    wait_statuses(&mut client, &all(std::slice::from_ref(&static_id), "healthy")).await;
    drop(client);
    drop(peer);
    let peer = start_in("peer", &peer_dir, &args);
    let mut client = peers(&peer).await;
    wait_statuses(&mut client, &all(std::slice::from_ref(&static_id), "healthy")).await;
}

mod dns {
    use std::sync::{Arc, Mutex};

    use hickory_proto::{
        op::{Message, OpCode},
        rr::{Name, RData, Record, RecordType, rdata::SRV},
    };

    /// A small authoritative DNS server on UDP 127.0.0.1: SRV records of
    /// `_grpc._tcp.blobs.test.` from `srv` (target, port), and `127.0.0.1` for any other name
    /// under `test.`.
    pub async fn start(srv: Arc<Mutex<Vec<(String, u16)>>>) -> std::net::SocketAddr {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut resp = Message::response(query.metadata.id, OpCode::Query);
                resp.metadata.authoritative = true;
                resp.metadata.recursion_desired = query.metadata.recursion_desired;
                resp.metadata.recursion_available = true;
                for q in &query.queries {
                    resp.add_query(q.clone());
                    let name = q.name().to_ascii().to_ascii_lowercase();
                    match q.query_type() {
                        RecordType::SRV if name == "_grpc._tcp.blobs.test." => {
                            for (target, port) in srv.lock().unwrap().iter() {
                                let target = Name::from_ascii(target).unwrap();
                                resp.add_answer(Record::from_rdata(
                                    q.name().clone(),
                                    0,
                                    RData::SRV(SRV::new(0, 10, *port, target)),
                                ));
                            }
                        }
                        RecordType::A if name.ends_with(".test.") && !name.starts_with('_') => {
                            resp.add_answer(Record::from_rdata(
                                q.name().clone(),
                                0,
                                RData::A(std::net::Ipv4Addr::LOCALHOST.into()),
                            ));
                        }
                        _ => {}
                    }
                }
                if let Ok(bytes) = resp.to_vec() {
                    let _ = sock.send_to(&bytes, from).await;
                }
            }
        });
        addr
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_follows_srv_records_of_a_real_dns_server() {
    let mut cluster = Cluster::new();
    let blobs: Vec<Node> = (0..3).map(|_| cluster.node("blob", &[])).collect();
    let srv: Arc<Mutex<Vec<(String, u16)>>> = Arc::default();
    *srv.lock().unwrap() = (0..2)
        .map(|i| (format!("blob-{i}.blobs.test."), blobs[i].grpc.port()))
        .collect();
    let dns_addr = dns::start(srv.clone()).await;
    let mut args = vec![
        s("--discovery"),
        s("dns"),
        s("--dns-name"),
        s("_grpc._tcp.blobs.test"),
        s("--dns-server"),
        dns_addr.to_string(),
        s("--dns-interval"),
        s("300ms"),
    ];
    args.extend(probe_flags());
    let peer = cluster.node("peer", &args);
    let mut client = peers(&peer).await;
    let id = |i: usize| format!("blob-{i}.blobs.test:{}", blobs[i].grpc.port());
    wait_statuses(&mut client, &all(&[id(0), id(1)], "healthy")).await;
    let p = client.get_peer(PeerRequest { id: id(0) }).await.unwrap().into_inner();
    assert_eq!(p.address, "127.0.0.1");
    assert_eq!(
        p.metadata.get("dns_target").map(String::as_str),
        Some("blob-0.blobs.test")
    );

    // A record appears, another goes: the next resolution follows.
    srv.lock()
        .unwrap()
        .push(("blob-2.blobs.test.".into(), blobs[2].grpc.port()));
    wait_statuses(&mut client, &all(&[id(0), id(1), id(2)], "healthy")).await;
    srv.lock().unwrap().remove(0);
    wait_statuses(&mut client, &all(&[id(1), id(2)], "healthy")).await;
    // No records at all is an empty membership, not an error.
    srv.lock().unwrap().clear();
    wait_statuses(&mut client, &BTreeMap::new()).await;
    assert_eq!(
        peer.metric("peervault_peer_discovery_errors_total", &[]).unwrap_or(0.0),
        0.0
    );

    // A/AAAA mode: the name's addresses with the port from --dns-port.
    let mut args = vec![
        s("--discovery"),
        s("dns"),
        s("--dns-name"),
        s("blobs-a.test"),
        s("--dns-port"),
        blobs[0].grpc.port().to_string(),
        s("--dns-server"),
        dns_addr.to_string(),
        s("--dns-interval"),
        s("300ms"),
    ];
    args.extend(probe_flags());
    let by_a = cluster.node("peer", &args);
    let mut client = peers(&by_a).await;
    let want = format!("127.0.0.1:{}", blobs[0].grpc.port());
    wait_statuses(&mut client, &all(&[want], "healthy")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_all_has_a_membership_of_itself() {
    let node = Node::start("all");
    let mut client = peers(&node).await;
    let own = format!("127.0.0.1:{}", node.grpc.port());
    wait_statuses(&mut client, &all(std::slice::from_ref(&own), "healthy")).await;
    node.wait_metric("peervault_membership_view_ready", &[], |v| v == 1.0);
}
