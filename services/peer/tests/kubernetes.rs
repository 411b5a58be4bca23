//! Kubernetes discovery against a local HTTP stand-in for the API server: the real kube-rs
//! client and watcher, the real JSON of an EndpointSliceList and of a watch stream (ADDED,
//! MODIFIED, DELETED, BOOKMARK, ERROR 410), plus a malformed object, an object without a
//! resourceVersion and a dropped connection. The membership view is checked after each step.
//!
//! The ConfigMap store of manual peers is tested against a stateful stand-in of the ConfigMap
//! API (GET, create, replace with resourceVersion, 404/409 Status answers): two stores writing
//! at once both land, and an injected concurrent write is retried.
//!
//! What this does not cover: a real API server's authentication, RBAC, pagination (`continue`),
//! the StreamingList initial strategy, and real kubelet/EndpointSlice controller behaviour.

use std::{sync::Arc, time::Duration};

use peervault_peer::{
    discovery::{Discovery, DiscoverySink, kubernetes::KubernetesDiscovery},
    events::EventSink,
    health::HealthPolicy,
    metrics::PeerMetrics,
    registry::{ManualPeers, Registry},
};
use peervault_proto::v1::{Event, MemberSource};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};

const WAIT: Duration = Duration::from_secs(30);

struct NoEvents;
impl EventSink for NoEvents {
    fn publish(&self, _: Event) {}
}

/// What the stand-in does with one watch response.
enum Action {
    /// Send one line of the stream.
    Line(String),
    /// Close the connection abruptly.
    Drop,
}

enum Reply {
    /// A complete JSON body.
    Body(String),
    /// A chunked watch stream fed by the test.
    Stream(mpsc::Receiver<Action>),
}

struct Incoming {
    target: String,
    reply: oneshot::Sender<Reply>,
}

impl Incoming {
    fn is_watch(&self) -> bool {
        self.target.contains("watch=true")
    }
    fn query(&self, key: &str) -> Option<String> {
        let q = self.target.split_once('?')?.1;
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.replace("%3D", "=").replace("%2F", "/"))
    }
}

/// A minimal HTTP/1.1 server: every request is handed to the test, which replies.
async fn stand_in() -> (String, mpsc::Receiver<Incoming>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { return };
            tokio::spawn(connection(sock, tx.clone()));
        }
    });
    (url, rx)
}

async fn connection(mut sock: TcpStream, tx: mpsc::Sender<Incoming>) {
    let mut buf = Vec::new();
    loop {
        // Read one request head (the client sends GETs without bodies).
        let head = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..pos]).to_string();
                buf.drain(..pos + 4);
                break head;
            }
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let target = head.split(' ').nth(1).unwrap_or_default().to_string();
        let (reply_tx, reply_rx) = oneshot::channel();
        if tx
            .send(Incoming {
                target,
                reply: reply_tx,
            })
            .await
            .is_err()
        {
            return;
        }
        let Ok(reply) = reply_rx.await else { return };
        match reply {
            Reply::Body(body) => {
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if sock.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
            Reply::Stream(mut actions) => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                loop {
                    match actions.recv().await {
                        Some(Action::Line(line)) => {
                            let data = format!("{line}\n");
                            let chunk = format!("{:x}\r\n{data}\r\n", data.len());
                            if sock.write_all(chunk.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        Some(Action::Drop) => return,
                        None => {
                            // The test is done with this stream: end it cleanly.
                            let _ = sock.write_all(b"0\r\n\r\n").await;
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// An EndpointSlice in the shape the API returns (discovery.k8s.io/v1).
fn slice(name: &str, rv: &str, endpoints: Value) -> Value {
    json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": "store",
            "uid": format!("uid-{name}"),
            "resourceVersion": rv,
            "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {
                "kubernetes.io/service-name": "blob",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            },
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Service", "name": "blob", "uid": "svc-uid",
                "controller": true, "blockOwnerDeletion": true
            }]
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [
            {"name": "metrics", "protocol": "TCP", "port": 9090},
            {"name": "grpc", "protocol": "TCP", "port": 8082, "appProtocol": "grpc"}
        ]
    })
}

fn endpoint(pod: &str, ip: &str, ready: bool, zone: &str, node: &str) -> Value {
    json!({
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": ready, "terminating": false},
        "hostname": pod,
        "targetRef": {"kind": "Pod", "namespace": "store", "name": pod, "uid": format!("pod-{pod}")},
        "nodeName": node,
        "zone": zone
    })
}

fn list(rv: &str, items: Vec<Value>) -> String {
    json!({
        "kind": "EndpointSliceList",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "items": items
    })
    .to_string()
}

fn watch_event(kind: &str, object: Value) -> String {
    json!({"type": kind, "object": object}).to_string()
}

/// (id, address, ready, zone, node) of every member.
type Row = (String, String, bool, String, String);

fn view(reg: &Registry) -> Vec<Row> {
    reg.list()
        .into_iter()
        .map(|p| {
            let m = p.member;
            assert_eq!(m.source, MemberSource::Kubernetes as i32);
            assert_eq!(m.port, 8082, "the port named grpc is used");
            (m.id, m.address, m.ready, m.zone, m.node_name)
        })
        .collect()
}

fn row(id: &str, ready: bool, zone: &str, node: &str) -> Row {
    (
        id.into(),
        format!("{id}.blob.store.svc"),
        ready,
        zone.into(),
        node.into(),
    )
}

async fn wait_view(reg: &Registry, want: &[Row]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = view(reg);
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "view never became {want:?}; it is {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next(rx: &mut mpsc::Receiver<Incoming>) -> Incoming {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the watcher sent no request")
        .expect("stand-in stopped")
}

/// Answers the next request, which must be a LIST, with `body`.
async fn expect_list(rx: &mut mpsc::Receiver<Incoming>, body: String) {
    let req = next(rx).await;
    assert!(!req.is_watch(), "expected a LIST, got {}", req.target);
    assert!(
        req.target
            .starts_with("/apis/discovery.k8s.io/v1/namespaces/store/endpointslices"),
        "{}",
        req.target
    );
    assert_eq!(
        req.query("labelSelector").as_deref(),
        Some("kubernetes.io/service-name=blob"),
        "{}",
        req.target
    );
    req.reply.send(Reply::Body(body)).ok().unwrap();
}

/// Answers the next request, which must be a WATCH from `rv`, with a stream the test feeds.
async fn expect_watch(rx: &mut mpsc::Receiver<Incoming>, rv: &str) -> mpsc::Sender<Action> {
    let req = next(rx).await;
    assert!(req.is_watch(), "expected a WATCH, got {}", req.target);
    assert_eq!(req.query("resourceVersion").as_deref(), Some(rv), "{}", req.target);
    let (tx, actions) = mpsc::channel(16);
    req.reply.send(Reply::Stream(actions)).ok().unwrap();
    tx
}

async fn send(stream: &mpsc::Sender<Action>, line: String) {
    stream.send(Action::Line(line)).await.unwrap();
}

#[tokio::test]
async fn endpointslice_watcher_follows_list_watch_and_recovers_from_errors() {
    let (url, mut requests) = stand_in().await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let metrics = PeerMetrics::new().unwrap();
    let reg = Registry::new(
        ManualPeers::default(),
        HealthPolicy::default(),
        metrics.clone(),
        Arc::new(NoEvents),
    );
    let discovery = Box::new(KubernetesDiscovery::new(client, "store", "blob", "grpc"));
    let task = tokio::spawn(discovery.run(DiscoverySink::new(reg.clone(), "kubernetes")));

    // 1. The initial LIST: one slice with a ready and a not-ready pod.
    let slice_a = |rv: &str, b1_ready: bool| {
        slice(
            "blob-abc12",
            rv,
            json!([
                endpoint("blob-0", "10.1.0.10", true, "zone-a", "node-1"),
                endpoint("blob-1", "10.1.0.11", b1_ready, "zone-b", "node-2"),
            ]),
        )
    };
    expect_list(&mut requests, list("100", vec![slice_a("99", false)])).await;
    wait_view(
        &reg,
        &[
            row("blob-0", true, "zone-a", "node-1"),
            row("blob-1", false, "zone-b", "node-2"),
        ],
    )
    .await;
    let p = reg.get("blob-0").unwrap().member;
    assert_eq!(p.metadata.get("ip").map(String::as_str), Some("10.1.0.10"));

    // 2. The watch from the list's resourceVersion.
    let w = expect_watch(&mut requests, "100").await;
    let slice_b = |rv: &str| {
        slice(
            "blob-def34",
            rv,
            json!([endpoint("blob-2", "10.1.0.12", true, "zone-c", "node-3")]),
        )
    };
    send(&w, watch_event("ADDED", slice_b("101"))).await;
    let three = [
        row("blob-0", true, "zone-a", "node-1"),
        row("blob-1", false, "zone-b", "node-2"),
        row("blob-2", true, "zone-c", "node-3"),
    ];
    wait_view(&reg, &three).await;
    send(&w, watch_event("MODIFIED", slice_a("102", true))).await;
    let three_ready = [
        row("blob-0", true, "zone-a", "node-1"),
        row("blob-1", true, "zone-b", "node-2"),
        row("blob-2", true, "zone-c", "node-3"),
    ];
    wait_view(&reg, &three_ready).await;
    send(&w, watch_event("DELETED", slice_b("103"))).await;
    let two_ready = [
        row("blob-0", true, "zone-a", "node-1"),
        row("blob-1", true, "zone-b", "node-2"),
    ];
    wait_view(&reg, &two_ready).await;
    // A BOOKMARK changes nothing in the view, only where the next watch resumes.
    send(
        &w,
        watch_event(
            "BOOKMARK",
            json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                   "metadata": {"resourceVersion": "110",
                                "annotations": {"k8s.io/initial-events-end": "true"}}}),
        ),
    )
    .await;
    // A malformed object (endpoints is not a list) is a watch error; the stream goes on and
    // the view keeps what it had.
    let mut malformed = slice_b("112");
    malformed["endpoints"] = json!("not-a-list");
    send(&w, watch_event("MODIFIED", malformed)).await;
    let errors = || metrics.discovery_errors.with_label_values(&["kubernetes"]).get();
    let deadline = tokio::time::Instant::now() + WAIT;
    while errors() < 1 {
        assert!(tokio::time::Instant::now() < deadline, "malformed object not reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_view(&reg, &two_ready).await;

    // 3. A dropped connection: the watcher watches again from the bookmark's version.
    w.send(Action::Drop).await.unwrap();
    let w = expect_watch(&mut requests, "110").await;
    send(&w, watch_event("ADDED", slice_b("111"))).await;
    wait_view(&reg, &three_ready).await;

    // 4. ERROR 410 Gone: the watcher lists again, and the new list replaces everything, so
    //    blob-1 (gone from the list) does not linger.
    send(
        &w,
        watch_event(
            "ERROR",
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "too old resource version: 111 (150)", "reason": "Expired", "code": 410}),
        ),
    )
    .await;
    let relisted = vec![
        slice(
            "blob-abc12",
            "150",
            json!([endpoint("blob-0", "10.1.0.10", true, "zone-a", "node-1")]),
        ),
        slice_b("151"),
    ];
    expect_list(&mut requests, list("152", relisted)).await;
    let after_gone = [
        row("blob-0", true, "zone-a", "node-1"),
        row("blob-2", true, "zone-c", "node-3"),
    ];
    wait_view(&reg, &after_gone).await;

    // 5. An object without a resourceVersion cannot be resumed from: re-list, no crash.
    let w = expect_watch(&mut requests, "152").await;
    let mut bad = slice(
        "blob-zzz",
        "0",
        json!([endpoint("blob-9", "10.1.0.19", true, "zone-a", "node-1")]),
    );
    bad["metadata"].as_object_mut().unwrap().remove("resourceVersion");
    send(&w, watch_event("ADDED", bad)).await;
    expect_list(&mut requests, list("160", vec![slice_b("151")])).await;
    wait_view(&reg, &[row("blob-2", true, "zone-c", "node-3")]).await;
    let _w = expect_watch(&mut requests, "160").await;
    assert!(errors() >= 3, "every error is counted: {}", errors());
    assert!(!task.is_finished(), "the watcher keeps running");
    task.abort();
}

/// A stateful stand-in for the ConfigMap part of the API: GET, POST (create) and PUT (replace)
/// with resourceVersion checks, answering 404/409 Status objects as the API server does. The
/// first replace is refused with 409 after a simulated concurrent write.
mod configmap_api {
    use std::sync::{Arc, Mutex};

    use serde_json::{Value, json};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    #[derive(Default)]
    pub struct State {
        pub object: Option<Value>,
        pub rv: u64,
        pub conflicts_served: u64,
        pub inject_conflict: bool,
    }

    pub async fn start(state: Arc<Mutex<State>>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                tokio::spawn(conn(sock, state.clone()));
            }
        });
        url
    }

    fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
        (
            code,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": message, "reason": reason,
                   "details": {"name": "peervault-peers", "kind": "configmaps"}, "code": code}),
        )
    }

    fn handle(state: &Mutex<State>, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let mut st = state.lock().unwrap();
        let base = "/api/v1/namespaces/store/configmaps";
        let one = format!("{base}/peervault-peers");
        let path = path.split('?').next().unwrap_or_default();
        match (method, path) {
            ("GET", p) if p == one => match &st.object {
                Some(o) => (200, o.clone()),
                None => status(404, "NotFound", "configmaps \"peervault-peers\" not found"),
            },
            ("POST", p) if p == base => {
                if st.object.is_some() {
                    st.conflicts_served += 1;
                    return status(409, "AlreadyExists", "configmaps \"peervault-peers\" already exists");
                }
                let mut o: Value = serde_json::from_slice(body).unwrap();
                st.rv += 1;
                o["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                o["metadata"]["namespace"] = json!("store");
                st.object = Some(o.clone());
                (201, o)
            }
            ("PUT", p) if p == one => {
                let mut o: Value = serde_json::from_slice(body).unwrap();
                let sent = o["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if st.inject_conflict {
                    // Another replica writes first.
                    st.inject_conflict = false;
                    st.rv += 1;
                    let rv = st.rv.to_string();
                    if let Some(obj) = st.object.as_mut() {
                        obj["metadata"]["resourceVersion"] = json!(rv);
                    }
                }
                if sent != st.rv.to_string() {
                    st.conflicts_served += 1;
                    return status(
                        409,
                        "Conflict",
                        "Operation cannot be fulfilled on configmaps \"peervault-peers\": the object has been modified; please apply your changes to the latest version and try again",
                    );
                }
                st.rv += 1;
                o["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                st.object = Some(o.clone());
                (200, o)
            }
            _ => status(404, "NotFound", "no such path"),
        }
    }

    async fn conn(mut sock: TcpStream, state: Arc<Mutex<State>>) {
        let mut buf = Vec::new();
        loop {
            let (head, pos) = loop {
                if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break (String::from_utf8_lossy(&buf[..pos]).to_string(), pos + 4);
                }
                let mut chunk = [0u8; 4096];
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < pos + len {
                let mut chunk = [0u8; 4096];
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body: Vec<u8> = buf[pos..pos + len].to_vec();
            buf.drain(..pos + len);
            let mut parts = head.split(' ');
            let method = parts.next().unwrap_or_default().to_string();
            let path = parts.next().unwrap_or_default().to_string();
            let (code, value) = handle(&state, &method, &path, &body);
            let text = value.to_string();
            let resp = format!(
                "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            );
            if sock.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_agree_through_the_configmap_store() {
    use peervault_peer::{
        registry::ManualPeer,
        store::{CONFIGMAP_KEY, ConfigMapStore, ManualStore},
    };
    let state: Arc<std::sync::Mutex<configmap_api::State>> = Arc::default();
    let url = configmap_api::start(state.clone()).await;
    let client = || kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let a = ConfigMapStore::new(client(), "store", "peervault-peers");
    let b = ConfigMapStore::new(client(), "store", "peervault-peers");
    assert_eq!(a.load().await.unwrap(), ManualPeers::default(), "no ConfigMap yet");

    let add = |id: String| -> peervault_peer::store::Change {
        Box::new(move |cur: &ManualPeers| {
            let mut n = cur.clone();
            n.added.insert(
                id.clone(),
                ManualPeer {
                    address: "10.0.0.1".into(),
                    port: 8082,
                    metadata: Default::default(),
                    created_at_ms: 1,
                },
            );
            Ok(n)
        })
    };
    // The first write creates it.
    a.update(add("first".into())).await.unwrap();
    // A concurrent writer gets in first once: the replace is retried on the new version.
    state.lock().unwrap().inject_conflict = true;
    b.update(add("second".into())).await.unwrap();
    assert!(state.lock().unwrap().conflicts_served >= 1);
    // Both replicas writing at once: every change lands.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (a, b) = (a.clone(), b.clone());
        let add_a = add(format!("a{i}"));
        let add_b = add(format!("b{i}"));
        tasks.push(tokio::spawn(async move { a.update(add_a).await.unwrap() }));
        tasks.push(tokio::spawn(async move { b.update(add_b).await.unwrap() }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let from_a = a.load().await.unwrap();
    assert_eq!(from_a, b.load().await.unwrap(), "both replicas read the same set");
    assert_eq!(from_a.added.len(), 18, "{:?}", from_a.added.keys().collect::<Vec<_>>());
    let stored = state.lock().unwrap().object.clone().unwrap();
    assert!(
        stored["data"][CONFIGMAP_KEY]
            .as_str()
            .unwrap()
            .contains("\"format\": 1")
    );
    // A refused change writes nothing.
    let rv = state.lock().unwrap().rv;
    let err = a
        .update(Box::new(|_| {
            Err(peervault_peer::PeerError::InvalidArgument("no".into()))
        }))
        .await
        .unwrap_err();
    assert!(matches!(err, peervault_peer::PeerError::InvalidArgument(_)));
    assert_eq!(state.lock().unwrap().rv, rv);
}
