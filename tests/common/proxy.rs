//! A fault-injecting TCP proxy for the cluster tests: one listener on 127.0.0.1 (port 0) in
//! front of one pod's gRPC port. The cluster harness gives the peer service the proxies'
//! addresses, so every pod-to-pod call (replication, probes) crosses one; clients of the tests
//! talk to the pods directly. Controls: [`Proxy::cut`] drops every open connection and
//! refuses or blackholes new ones, [`Proxy::restore`] lets traffic through again,
//! [`Proxy::set_delay`] holds every forwarded read for a while.
//!
//! The proxies run on their own small runtime, so a test that blocks a worker of its own
//! runtime (starting a process, waiting for a metric) never stalls pod-to-pod traffic.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// What a cut link does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// Accepted and closed at once (the caller sees a reset or EOF right away).
    Refuse,
    /// Accepted and held without a byte forwarded until the link is restored (the caller
    /// sees a timeout, as with a dropped route).
    Blackhole,
}

struct State {
    target: std::sync::Mutex<SocketAddr>,
    /// `Some(mode)` while cut.
    cut: std::sync::Mutex<Option<CutMode>>,
    cut_flag: AtomicBool,
    delay_ms: AtomicU64,
    /// Bumped on every cut and restore: connections of an older epoch close.
    epoch: watch::Sender<u64>,
    /// Connections accepted while cut (refused or blackholed), for tests to see traffic tried.
    rejected: AtomicUsize,
    /// Connections forwarded.
    forwarded: AtomicUsize,
}

/// One proxy. Dropping it stops accepting (open connections close with the runtime's tasks at
/// the next cut or when either end closes).
pub struct Proxy {
    /// The address to give to whoever should go through the proxy.
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: watch::Sender<bool>,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-proxy")
            .enable_all()
            .build()
            .expect("proxy runtime")
    })
}

impl Proxy {
    /// A proxy on 127.0.0.1:0 forwarding to `target` (which may not be listening yet: a
    /// connection made before it is closed at once, like a refused connect).
    pub fn start(target: SocketAddr) -> Proxy {
        // Bound here (std), served on the proxy runtime: callable from inside another runtime.
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a proxy port");
        std_listener.set_nonblocking(true).expect("non-blocking proxy socket");
        let addr = std_listener.local_addr().expect("proxy address");
        let (epoch, _) = watch::channel(0u64);
        let state = Arc::new(State {
            target: std::sync::Mutex::new(target),
            cut: std::sync::Mutex::new(None),
            cut_flag: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            epoch,
            rejected: AtomicUsize::new(0),
            forwarded: AtomicUsize::new(0),
        });
        let (stop, mut stopped) = watch::channel(false);
        let st = state.clone();
        runtime().spawn(async move {
            let Ok(listener) = TcpListener::from_std(std_listener) else {
                return;
            };
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stopped.changed() => return,
                };
                let Ok((conn, _)) = accepted else { continue };
                let st = st.clone();
                tokio::spawn(async move { serve(st, conn).await });
            }
        });
        Proxy { addr, state, stop }
    }

    /// Cuts the link: every open connection is dropped; new ones are refused or blackholed.
    pub fn cut(&self, mode: CutMode) {
        *self.state.cut.lock().unwrap() = Some(mode);
        self.state.cut_flag.store(true, Ordering::SeqCst);
        self.state.epoch.send_modify(|e| *e += 1);
    }

    /// Lets traffic through again (blackholed connections are closed, so callers reconnect).
    pub fn restore(&self) {
        let was = self.state.cut.lock().unwrap().take();
        self.state.cut_flag.store(false, Ordering::SeqCst);
        if was.is_some() {
            self.state.epoch.send_modify(|e| *e += 1);
        }
    }

    /// Forwards new connections to `target` from now on (a pod restarted on another port).
    pub fn set_target(&self, target: SocketAddr) {
        *self.state.target.lock().unwrap() = target;
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        self.state.cut_flag.load(Ordering::SeqCst)
    }

    /// Holds every forwarded read this long before writing it on (0: no delay).
    pub fn set_delay(&self, d: Duration) {
        self.state.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Connections refused or blackholed so far.
    pub fn rejected(&self) -> usize {
        self.state.rejected.load(Ordering::SeqCst)
    }

    /// Connections forwarded so far.
    pub fn forwarded(&self) -> usize {
        self.state.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        // Close whatever is open.
        self.state.epoch.send_modify(|e| *e += 1);
    }
}

async fn serve(st: Arc<State>, conn: TcpStream) {
    let mut epoch = st.epoch.subscribe();
    let mode = *st.cut.lock().unwrap();
    match mode {
        Some(CutMode::Refuse) => {
            st.rejected.fetch_add(1, Ordering::SeqCst);
            drop(conn);
            return;
        }
        Some(CutMode::Blackhole) => {
            st.rejected.fetch_add(1, Ordering::SeqCst);
            // Hold it, read nothing, until the link changes.
            let _ = epoch.changed().await;
            return;
        }
        None => {}
    }
    let target = *st.target.lock().unwrap();
    let Ok(upstream) = TcpStream::connect(target).await else {
        return;
    };
    let _ = conn.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    st.forwarded.fetch_add(1, Ordering::SeqCst);
    let (cr, cw) = conn.into_split();
    let (ur, uw) = upstream.into_split();
    let a = pump(st.clone(), cr, uw);
    let b = pump(st.clone(), ur, cw);
    tokio::select! {
        _ = async { tokio::join!(a, b) } => {}
        _ = epoch.changed() => {} // cut (or restored after a cut): drop both ends
    }
}

async fn pump(st: Arc<State>, mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let d = st.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if st.cut_flag.load(Ordering::SeqCst) || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
