//! The cluster harness shared by `tests/cluster.rs` and `tests/cluster_faults.rs`: one
//! development CA, a peer service with static discovery, blob pods on fixed ports (so a pod
//! comes back on its address after a restart), optionally each behind a fault-injecting
//! [`Proxy`] that every pod-to-pod call crosses; and the client helpers the tests share.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use bytes::Bytes;
use peervault_proto::v1::{
    FileChunk, FileRequest, FileResponse, GetRecordRequest, ListFilesRequest, file_service_client::FileServiceClient,
    replication_service_client::ReplicationServiceClient,
};
use tonic::transport::Channel;

use super::{Node, NodeBuilder, WAIT, free_port, proxy::Proxy};

pub const TLS_FILES: [&str; 5] = ["ca.crt", "server.crt", "server.key", "client.crt", "client.key"];

pub fn s(v: &str) -> String {
    v.to_string()
}

/// A cluster: one CA, a peer service with a static list, blob pods on fixed ports (so a pod
/// comes back on its address after a restart).
pub struct Cluster {
    pub tls: tempfile::TempDir,
    pub dirs: Vec<tempfile::TempDir>,
    pub peer_port: u16,
    pub blob_ports: Vec<u16>,
    pub blob_dirs: Vec<PathBuf>,
    pub peer: Option<Node>,
    pub pods: Vec<Option<Node>>,
    /// Flags every pod gets.
    pub extra: Vec<String>,
    /// Flags (and environment) for one pod only, e.g. a skewed clock.
    pub pod_extra: Vec<Vec<String>>,
    pub pod_env: Vec<Vec<(String, String)>>,
    /// One proxy per pod when built with [`Cluster::new_proxied`]: the membership lists the
    /// proxies' addresses, so pod-to-pod calls and the peer service's probes cross them.
    pub proxies: Vec<Proxy>,
}

impl Cluster {
    /// A cluster of `n` pods, not started; pods talk to each other directly.
    pub fn new(n: usize, extra: &[&str]) -> Self {
        let tls = tempfile::tempdir().unwrap();
        peervault_runtime::tls::ensure_dev_certs(tls.path(), "peervault.local").unwrap();
        let mut c = Cluster {
            tls,
            dirs: vec![],
            peer_port: free_port(),
            blob_ports: (0..n).map(|_| free_port()).collect(),
            blob_dirs: vec![],
            peer: None,
            pods: vec![],
            extra: extra.iter().map(|x| x.to_string()).collect(),
            pod_extra: vec![vec![]; n],
            pod_env: vec![vec![]; n],
            proxies: vec![],
        };
        for _ in 0..n {
            let d = c.data_dir();
            c.blob_dirs.push(d);
        }
        c
    }

    /// Like [`Cluster::new`], with every pod behind its own proxy.
    pub fn new_proxied(n: usize, extra: &[&str]) -> Self {
        let mut c = Cluster::new(n, extra);
        c.proxies = c
            .blob_ports
            .iter()
            .map(|p| Proxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], *p))))
            .collect();
        c
    }

    /// Starts a proxied cluster of `n` pods and waits until every pod sees all of them.
    pub fn start_proxied(n: usize, extra: &[&str]) -> Self {
        let mut c = Cluster::new_proxied(n, extra);
        c.start_peer();
        for i in 0..n {
            c.start_pod(i);
        }
        c.wait_members(n);
        c
    }

    /// The proxy in front of pod `i`.
    pub fn proxy(&self, i: usize) -> &Proxy {
        &self.proxies[i]
    }

    pub fn data_dir(&mut self) -> PathBuf {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(data.join("tls")).unwrap();
        for f in TLS_FILES {
            std::fs::copy(self.tls.path().join(f), data.join("tls").join(f)).unwrap();
        }
        self.dirs.push(t);
        data
    }

    /// Member ids (and addresses in the membership): the pods' ports, or their proxies'.
    pub fn ids(&self) -> Vec<String> {
        if self.proxies.is_empty() {
            self.blob_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
        } else {
            self.proxies.iter().map(|p| p.addr.to_string()).collect()
        }
    }

    /// Starts the peer service with every pod in its static list.
    pub fn start_peer(&mut self) {
        self.start_peer_listing(self.blob_ports.len());
    }

    /// Starts the peer service with the first `n` pods in its static list (the others can be
    /// added with AddPeer).
    pub fn start_peer_listing(&mut self, n: usize) {
        let listed = self.ids()[..n].join(",");
        let dir = self.data_dir();
        let mut b = NodeBuilder::new("peer").data_dir(&dir);
        for a in [
            s("--discovery"),
            s("static"),
            s("--peers"),
            listed,
            s("--probe-interval"),
            s("200ms"),
            s("--probe-timeout"),
            s("300ms"),
            s("--probe-down-after"),
            s("3"),
            s("--probe-up-after"),
            s("2"),
        ] {
            b = b.arg(a);
        }
        self.peer = Some(
            b.start_listening(&format!("127.0.0.1:{}", self.peer_port), "127.0.0.1:0")
                .0,
        );
    }

    pub fn start_pod(&mut self, i: usize) {
        let mut b = NodeBuilder::new("blob").data_dir(&self.blob_dirs[i]);
        // Behind a proxy the pod knows itself by its member id (the proxy's address).
        let node_id = if self.proxies.is_empty() {
            format!("blob-{i}")
        } else {
            self.ids()[i].clone()
        };
        for a in [
            s("--peer-endpoint"),
            format!("127.0.0.1:{}", self.peer_port),
            s("--node-id"),
            node_id,
            s("--chunk-size"),
            s("65536"),
            s("--replication-timeout"),
            s("2s"),
            s("--anti-entropy-interval"),
            s("1s"),
        ] {
            b = b.arg(a);
        }
        for a in self.extra.iter().chain(self.pod_extra.get(i).into_iter().flatten()) {
            b = b.arg(a.clone());
        }
        for (k, v) in self.pod_env.get(i).into_iter().flatten() {
            b = b.env(k, v.clone());
        }
        // Behind a proxy a pod listens on a fresh port each start and the proxy follows it
        // (no port reserved ahead that another process could take meanwhile); without one it
        // comes back on its fixed port.
        let listen = if self.proxies.is_empty() {
            format!("127.0.0.1:{}", self.blob_ports[i])
        } else {
            "127.0.0.1:0".to_string()
        };
        let node = b.start_listening(&listen, "127.0.0.1:0").0;
        if let Some(p) = self.proxies.get(i) {
            p.set_target(node.grpc);
            self.blob_ports[i] = node.grpc.port();
        }
        if self.pods.len() <= i {
            self.pods.resize_with(i + 1, || None);
        }
        self.pods[i] = Some(node);
    }

    /// Starts a cluster of `n` pods and waits until every pod sees all of them.
    pub fn start(n: usize, extra: &[&str]) -> Self {
        let mut c = Cluster::new(n, extra);
        c.start_peer();
        for i in 0..n {
            c.start_pod(i);
        }
        c.wait_members(n);
        c
    }

    /// Waits until every running pod has `n` members, all ready, in its view.
    pub fn wait_members(&self, n: usize) {
        let n = n as f64;
        for p in self.pods.iter().flatten() {
            p.wait_metric("peervault_replication_members", &[], |v| v == n);
            p.wait_metric("peervault_membership_view_ready", &[], |v| v == n);
        }
    }

    pub fn pod(&self, i: usize) -> &Node {
        self.pods[i].as_ref().expect("pod is running")
    }

    /// kill -9.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut n) = self.pods[i].take() {
            n.signal("KILL");
            n.wait_exit(WAIT);
        }
    }

    pub async fn files(&self, i: usize) -> FileServiceClient<Channel> {
        FileServiceClient::new(self.pod(i).channel().await)
    }

    pub async fn repl(&self, i: usize) -> ReplicationServiceClient<Channel> {
        ReplicationServiceClient::new(self.pod(i).service_channel().await)
    }

    /// Waits until the peer service (and so every pod's view) sees pod `i` as ready or not.
    pub fn wait_ready(&self, i: usize, ready: bool) {
        let want = if ready { 1.0 } else { 0.0 };
        let label = format!("peer=\"{}\"", self.ids()[i]);
        self.peer
            .as_ref()
            .unwrap()
            .wait_metric("peervault_peer_up", &[&label], |v| v == want);
    }
}

/// A FileRequest for `key` (other fields default, whatever fields the message gains).
#[allow(clippy::needless_update)]
pub fn file_req(key: &str) -> FileRequest {
    FileRequest {
        key: key.into(),
        ..Default::default()
    }
}

pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub async fn upload(c: &mut FileServiceClient<Channel>, key: &str, data: &[u8]) -> Result<FileResponse, tonic::Status> {
    // Several messages so large files take the streaming path.
    let piece = 40_000;
    let mut msgs = Vec::new();
    let mut off = 0usize;
    loop {
        let end = (off + piece).min(data.len());
        msgs.push(FileChunk {
            file_key: key.to_string(),
            data: Bytes::copy_from_slice(&data[off..end]),
            offset: off as i64,
            is_last: end == data.len(),
            ..Default::default()
        });
        off = end;
        if off == data.len() {
            break;
        }
    }
    c.upload_file(tokio_stream::iter(msgs)).await.map(|r| r.into_inner())
}

pub async fn download(c: &mut FileServiceClient<Channel>, key: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut s = c.download_file(file_req(key)).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        assert_eq!(m.offset as usize, out.len());
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

pub async fn list_all(c: &mut FileServiceClient<Channel>, page_size: i32) -> Vec<String> {
    let mut keys = Vec::new();
    let mut token = String::new();
    for _ in 0..1000 {
        let r = c
            .list_files(ListFilesRequest {
                page_size,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        keys.extend(r.files.into_iter().map(|f| f.key));
        if r.next_page_token.is_empty() {
            return keys;
        }
        token = r.next_page_token;
    }
    panic!("pagination never ended");
}

/// Polls `f` every 50 ms until it returns true, for at most `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn statuses(r: &FileResponse) -> Vec<String> {
    r.replicas.iter().map(|x| x.status.clone()).collect()
}

/// Three replicas listed, a majority of them synced (a replica slower than the coordinator's
/// straggler grace, on a loaded machine, is `pending` and gets the file from the hand-off
/// queue).
pub fn assert_acknowledged_by_majority(r: &FileResponse) {
    assert_eq!(r.replicas.len(), 3, "{r:?}");
    let synced = r.replicas.iter().filter(|x| x.status == "synced").count();
    assert!(synced >= 2, "{r:?}");
    assert!(
        r.replicas.iter().all(|x| x.status == "synced" || x.status == "pending"),
        "{r:?}"
    );
}

/// Waits until no pod has replicas left to hand off.
pub fn wait_drained(cl: &Cluster) {
    for p in cl.pods.iter().flatten() {
        p.wait_metric("peervault_replication_handoff_queue_depth", &[], |v| v == 0.0);
    }
}

/// Which pods hold a record of `key` (asked with a service identity).
pub async fn holders(cl: &Cluster, key: &str, pods: &[usize]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for &i in pods {
        let mut r = cl.repl(i).await;
        let got = r
            .get_record(GetRecordRequest { key: key.into() })
            .await
            .unwrap()
            .into_inner()
            .record;
        if got.is_some_and(|r| !r.deleted) {
            out.insert(cl.ids()[i].clone());
        }
    }
    out
}

pub fn expected_owners(ids: &[String], key: &str) -> BTreeSet<String> {
    use peervault_blob::{cluster::placement, store::replica::key_partition};
    let members: Vec<placement::Member> = ids
        .iter()
        .map(|id| placement::Member {
            id: id.clone(),
            zone: String::new(),
            node: String::new(),
        })
        .collect();
    placement::owners_of(key_partition(key), &members, 3)
        .into_iter()
        .collect()
}

/// A small deterministic generator for the fault test (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
