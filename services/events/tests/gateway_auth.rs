//! The WebSocket gateway's authentication hook over real sockets (plaintext here: the TLS port
//! and the runtime's credentials are tested with real processes in `tests/security.rs`): a token
//! in the query or the Authorization header, or an auth message after connecting; AUTH_FAILED
//! for a bad token or no auth in time; a credential revoked while connected closes the
//! connection; the per-address connection cap; repeated failures raise a security_alert.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use peervault_events::{
    EventsCore, TokenValidator,
    alerts::AlertEngine,
    hub::{Delivery, Filter, Hub, HubConfig},
    metrics::EventsMetrics,
    settings::{AlertSettings, Origins, WsSettings},
    topics::{Topic, TopicSet},
    ws::Gateway,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

const WAIT: Duration = Duration::from_secs(20);

/// Accepts `good-token`; `revocable` until `revoked` is set.
#[derive(Default)]
struct OneToken {
    revoked: AtomicBool,
}

fn caller(name: &str) -> peervault_runtime::Caller {
    peervault_runtime::Caller {
        identity: peervault_runtime::Identity::ApiKey {
            id: name.into(),
            name: name.into(),
        },
        remote_addr: None,
        scopes: peervault_runtime::auth::ScopeSet::ALL,
        key_prefix: None,
        valid_until: None,
    }
}

impl TokenValidator for OneToken {
    fn validate<'a>(
        &'a self,
        token: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<peervault_runtime::Caller, String>> {
        let r = match token {
            "good-token" => Ok(caller("dashboard")),
            "revocable" if !self.revoked.load(Ordering::SeqCst) => Ok(caller("revocable")),
            _ => Err("unknown token".into()),
        };
        Box::pin(std::future::ready(r))
    }

    fn revalidate(&self, c: &peervault_runtime::Caller) -> Result<(), String> {
        match &c.identity {
            peervault_runtime::Identity::ApiKey { id, .. }
                if id == "revocable" && self.revoked.load(Ordering::SeqCst) =>
            {
                Err("this API key has been revoked".into())
            }
            _ => Ok(()),
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn start(read_timeout: Duration) -> (std::net::SocketAddr, EventsCore, tokio::sync::watch::Sender<bool>) {
    let (addr, core, stop, _) = start_with(read_timeout, 10).await;
    (addr, core, stop)
}

async fn start_with(
    read_timeout: Duration,
    per_address: usize,
) -> (
    std::net::SocketAddr,
    EventsCore,
    tokio::sync::watch::Sender<bool>,
    Arc<OneToken>,
) {
    let metrics = EventsMetrics::unregistered();
    let hub = Hub::new(
        HubConfig {
            node: "ev-test".into(),
            replay_capacity: 100,
            subscriber_queue: 64,
        },
        metrics.clone(),
    );
    let alerts = AlertEngine::new(
        AlertSettings {
            storage_usage_percent: 90.0,
            memory_usage_percent: 90.0,
            replication_backlog: 1000.0,
            auth_failures: 3,
            auth_failure_window: Duration::from_secs(60),
        },
        "events/ev-test".into(),
        metrics,
    );
    let core = EventsCore::new(hub, alerts);
    let ws = WsSettings {
        host: "127.0.0.1".into(),
        port: 0,
        origins: Origins::Any,
        read_timeout,
        write_timeout: Duration::from_secs(5),
        ping_period: Duration::from_secs(54),
        pong_wait: Duration::from_secs(60),
        max_connections: 10,
        max_message_size: 1 << 20,
        messages_per_second: 100,
        max_connections_per_address: per_address,
        allow_anonymous: false,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let tokens = Arc::new(OneToken::default());
    let validator: Arc<dyn TokenValidator> = tokens.clone();
    tokio::spawn(Gateway::new(core.clone(), ws, validator, rx).serve(listener, None));
    (addr, core, tx, tokens)
}

async fn next(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(f) => return json!({"closed": f.map(|f| u16::from(f.code))}),
            _ => continue,
        }
    }
}

async fn connect(url: String, bearer: Option<&str>) -> Ws {
    let mut req = url.into_client_request().unwrap();
    if let Some(b) = bearer {
        req.headers_mut()
            .insert("authorization", format!("Bearer {b}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

#[tokio::test]
async fn tokens_in_the_query_or_header_are_checked() {
    let (addr, _core, _stop) = start(Duration::from_secs(30)).await;
    for mut ws in [
        connect(format!("ws://{addr}/ws?token=good-token"), None).await,
        connect(format!("ws://{addr}/ws"), Some("good-token")).await,
    ] {
        let hello = next(&mut ws).await;
        assert_eq!(
            (hello["type"].as_str(), hello["data"]["authRequired"].as_bool()),
            (Some("connected"), Some(false))
        );
        ws.send(Message::text(r#"{"type":"subscribe","topic":"alerts"}"#))
            .await
            .unwrap();
        assert_eq!(next(&mut ws).await["type"], "subscribed");
    }
    for mut ws in [
        connect(format!("ws://{addr}/ws?token=bad"), None).await,
        connect(format!("ws://{addr}/ws"), Some("bad")).await,
    ] {
        let e = next(&mut ws).await;
        assert_eq!(e["data"]["code"], "AUTH_FAILED", "{e}");
        assert_eq!(
            e["data"]["message"],
            "Invalid authentication credentials: unknown token"
        );
        assert_eq!(next(&mut ws).await["closed"], 1008);
    }
}

#[tokio::test]
async fn an_auth_message_after_connecting_unlocks_the_connection() {
    let (addr, _core, _stop) = start(Duration::from_secs(30)).await;
    let mut ws = connect(format!("ws://{addr}/ws"), None).await;
    assert_eq!(next(&mut ws).await["data"]["authRequired"], true);
    ws.send(Message::text(r#"{"type":"subscribe","topic":"alerts"}"#))
        .await
        .unwrap();
    let e = next(&mut ws).await;
    assert_eq!(e["data"]["code"], "AUTH_FAILED", "{e}");
    ws.send(Message::text(r#"{"type":"auth","data":{"token":"good-token"}}"#))
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await["type"], "authenticated");
    ws.send(Message::text(r#"{"type":"subscribe","topic":"alerts"}"#))
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await["type"], "subscribed");

    let mut bad = connect(format!("ws://{addr}/ws"), None).await;
    next(&mut bad).await;
    bad.send(Message::text(r#"{"type":"auth","data":{"token":"nope"}}"#))
        .await
        .unwrap();
    assert_eq!(next(&mut bad).await["data"]["code"], "AUTH_FAILED");
    assert_eq!(next(&mut bad).await["closed"], 1008);
}

#[tokio::test]
async fn no_auth_within_the_read_timeout_is_refused() {
    let (addr, _core, _stop) = start(Duration::from_millis(300)).await;
    let mut ws = connect(format!("ws://{addr}/ws"), None).await;
    next(&mut ws).await;
    let e = next(&mut ws).await;
    assert_eq!(e["data"]["code"], "AUTH_FAILED", "{e}");
    assert!(e["data"]["message"].as_str().unwrap().contains("read timeout"), "{e}");
    assert_eq!(next(&mut ws).await["closed"], 1008);
}

#[tokio::test]
async fn repeated_failures_raise_a_security_alert() {
    let (addr, core, _stop) = start(Duration::from_secs(30)).await;
    let mut alerts = core
        .hub
        .subscribe(
            Filter::topics([Topic::Alerts].into_iter().collect::<TopicSet>()),
            None,
            "grpc",
        )
        .unwrap();
    for _ in 0..3 {
        let mut ws = connect(format!("ws://{addr}/ws?token=wrong"), None).await;
        assert_eq!(next(&mut ws).await["data"]["code"], "AUTH_FAILED");
    }
    let d = tokio::time::timeout(WAIT, alerts.next()).await.unwrap().unwrap();
    let Delivery::Event(e) = d else { panic!("{d:?}") };
    assert_eq!(e.event.r#type, "security_alert");
    let data: Value = serde_json::from_str(&e.event.data_json).unwrap();
    assert_eq!(
        (data["metric"].as_str(), data["threshold"].as_f64()),
        (Some("auth_failures"), Some(3.0))
    );
    assert_eq!(data["subject"], "127.0.0.1");
}

#[tokio::test]
async fn shutdown_closes_connections_with_going_away() {
    let (addr, _core, stop) = start(Duration::from_secs(30)).await;
    let mut ws = connect(format!("ws://{addr}/ws?token=good-token"), None).await;
    next(&mut ws).await;
    stop.send(true).unwrap();
    assert_eq!(next(&mut ws).await["closed"], 1001);
}

#[tokio::test]
async fn a_credential_revoked_while_connected_closes_the_connection() {
    let (addr, _core, _stop, tokens) = start_with(Duration::from_secs(30), 10).await;
    let mut ws = connect(format!("ws://{addr}/ws?token=revocable"), None).await;
    assert_eq!(next(&mut ws).await["type"], "connected");
    ws.send(Message::text(r#"{"type":"subscribe","topic":"alerts"}"#))
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await["type"], "subscribed");
    let mut keep = connect(format!("ws://{addr}/ws?token=good-token"), None).await;
    next(&mut keep).await;
    let revoked_at = std::time::Instant::now();
    tokens.revoked.store(true, Ordering::SeqCst);
    let e = next(&mut ws).await;
    assert_eq!(e["data"]["code"], "AUTH_FAILED", "{e}");
    assert!(e["data"]["message"].as_str().unwrap().contains("revoked"), "{e}");
    assert_eq!(next(&mut ws).await["closed"], 1008);
    assert!(
        revoked_at.elapsed() < Duration::from_secs(5),
        "{:?}",
        revoked_at.elapsed()
    );
    // Another credential's connection stays.
    keep.send(Message::text(r#"{"type":"ping"}"#)).await.unwrap();
    assert_eq!(next(&mut keep).await["type"], "pong");
}

#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let (addr, _core, _stop, _) = start_with(Duration::from_secs(30), 2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut ws = connect(format!("ws://{addr}/ws?token=good-token"), None).await;
        assert_eq!(next(&mut ws).await["type"], "connected");
        held.push(ws);
    }
    let mut third = connect(format!("ws://{addr}/ws?token=good-token"), None).await;
    let e = next(&mut third).await;
    assert_eq!(e["data"]["code"], "CONNECTION_REFUSED", "{e}");
    assert!(e["data"]["message"].as_str().unwrap().contains("per address"), "{e}");
    assert_eq!(next(&mut third).await["closed"], 1013);
    // A slot freed is a slot again.
    drop(held.pop());
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut ws = connect(format!("ws://{addr}/ws?token=good-token"), None).await;
        if next(&mut ws).await["type"] == "connected" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the freed slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
