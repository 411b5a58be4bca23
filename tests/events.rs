//! Events service through real processes: publishing with a service identity, receiving over
//! gRPC (Subscribe and the published streams) and over a real WebSocket client, resuming,
//! lagging, every bad WebSocket input, and publishers surviving an events pod restart.

mod common;

use std::time::{Duration, Instant};

use common::{
    Node, NodeBuilder, WAIT, free_port,
    ws::{Cred, WsTarget, https_get, wss_connect},
};
use futures_util::{SinkExt, StreamExt};
use peervault_proto::v1::{
    Event, FileChunk, PublishRequest, SubscribeRequest, event::Payload, event_service_client::EventServiceClient,
    file_service_client::FileServiceClient, peer_vault_service_client::PeerVaultServiceClient,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};
use tonic::Streaming;

type Ws = common::ws::Wss;

/// An events node that publishes no metrics events of its own, so sequence numbers in a test
/// are the test's alone.
fn quiet_events() -> NodeBuilder {
    NodeBuilder::new("events").arg("--metrics-interval").arg("0s")
}

fn file_event(id: &str, key: &str) -> Event {
    Event {
        id: id.into(),
        topic: "file_operations".into(),
        r#type: "file_uploaded".into(),
        source: "blob/test".into(),
        data_json: json!({"key": key, "size": 1024, "node": "blob-0"}).to_string(),
        ..Default::default()
    }
}

async fn publish(node: &Node, events: Vec<Event>) -> u32 {
    EventServiceClient::new(node.service_channel().await)
        .publish(PublishRequest { events })
        .await
        .expect("publish")
        .into_inner()
        .accepted
}

async fn subscribe(node: &Node, req: SubscribeRequest) -> Streaming<Event> {
    EventServiceClient::new(node.channel().await)
        .subscribe(req)
        .await
        .expect("subscribe")
        .into_inner()
}

/// The next message of a gRPC stream, bounded in time.
async fn next<T>(s: &mut Streaming<T>) -> T {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("stream stalled")
        .expect("stream failed")
        .expect("stream ended")
}

/// A WebSocket over TLS authenticated with the development client certificate (the port's
/// default: TLS, credentials required).
async fn ws_connect(http: &WsTarget) -> Ws {
    wss_connect(http, &Cred::DevCert, None)
        .await
        .expect("WebSocket connect")
}

/// The next text message as JSON (pings and pongs skipped), bounded in time.
async fn ws_next(ws: &mut Ws) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, ws.next())
            .await
            .expect("WebSocket stalled")
            .expect("WebSocket ended")
            .expect("WebSocket failed");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("server sent JSON"),
            Message::Close(f) => panic!("closed: {f:?}"),
            _ => continue,
        }
    }
}

async fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Connects, checks the welcome message and subscribes to `topic`.
async fn ws_subscribed(http: &WsTarget, topic: &str) -> Ws {
    let mut ws = ws_connect(http).await;
    let hello = ws_next(&mut ws).await;
    assert_eq!(hello["type"], "connected", "{hello}");
    assert!(hello["clientId"].is_string());
    ws_send(&mut ws, json!({"type": "subscribe", "topic": topic})).await;
    let ack = ws_next(&mut ws).await;
    assert_eq!(
        (ack["type"].as_str(), ack["topic"].as_str()),
        (Some("subscribed"), Some(topic)),
        "{ack}"
    );
    ws
}

/// The close frame that ends the connection (other messages skipped), bounded in time.
async fn ws_close_code(ws: &mut Ws) -> Option<u16> {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await.expect("no close in time") {
            Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

fn seq_of(e: &Event) -> u64 {
    assert!(matches!(e.payload, Some(Payload::FileOperation(_))), "{e:?}");
    e.sequence
}

#[tokio::test]
async fn published_events_reach_grpc_and_websocket_subscribers() {
    let (node, http) = quiet_events().start_events_ws();
    let mut sub = subscribe(
        &node,
        SubscribeRequest {
            topics: vec!["file_operations".into()],
            ..Default::default()
        },
    )
    .await;
    let mut files = EventServiceClient::new(node.channel().await)
        .stream_file_operations(())
        .await
        .unwrap()
        .into_inner();
    let mut ws = ws_subscribed(&http, "file_operations").await;
    let mut ws_system = ws_subscribed(&http, "system").await;

    assert_eq!(publish(&node, vec![file_event("e1", "photos/cat.jpg")]).await, 1);

    let e = next(&mut sub).await;
    assert_eq!(
        (e.sequence, e.r#type.as_str(), e.topic.as_str()),
        (1, "file_uploaded", "file_operations")
    );
    assert!(!e.node.is_empty());
    let Some(Payload::FileOperation(f)) = &e.payload else {
        panic!("{e:?}")
    };
    assert_eq!(
        (f.event_type.as_str(), f.file_key.as_str(), f.size),
        ("upload", "photos/cat.jpg", 1024)
    );

    let f = next(&mut files).await;
    assert_eq!(
        (f.event_type.as_str(), f.file_key.as_str(), f.peer_id.as_str()),
        ("upload", "photos/cat.jpg", "blob-0")
    );

    let m = ws_next(&mut ws).await;
    assert_eq!(m["type"], "file_uploaded", "{m}");
    assert_eq!(m["topic"], "file_operations");
    assert_eq!(m["data"]["key"], "photos/cat.jpg");
    assert_eq!(m["data"]["size"], 1024);
    assert_eq!(m["data"]["node"], "blob-0");
    assert!(m["data"]["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(m["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(m["sequence"], 1);

    // A duplicate id is not delivered again; the system subscriber saw no file event.
    assert_eq!(publish(&node, vec![file_event("e1", "photos/cat.jpg")]).await, 0);
    ws_send(&mut ws_system, json!({"type": "ping"})).await;
    assert_eq!(ws_next(&mut ws_system).await["type"], "pong");

    // Unsubscribing stops delivery.
    ws_send(&mut ws, json!({"type": "unsubscribe", "topic": "file_operations"})).await;
    assert_eq!(ws_next(&mut ws).await["type"], "unsubscribed");
    publish(&node, vec![file_event("e2", "k2")]).await;
    assert_eq!(next(&mut sub).await.sequence, 2);
    ws_send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(ws_next(&mut ws).await["type"], "pong");

    node.wait_metric(
        "peervault_events_delivered_total",
        &["transport=\"websocket\"", "topic=\"file_operations\""],
        |v| v == 1.0,
    );
    node.wait_metric(
        "peervault_events_published_total",
        &["topic=\"file_operations\""],
        |v| v == 2.0,
    );
    node.wait_metric("peervault_events_duplicates_total", &[], |v| v == 1.0);
    node.wait_metric("peervault_events_subscribers", &["transport=\"websocket\""], |v| {
        v == 1.0
    });
    assert!(
        node.metric(
            "peervault_events_delivery_latency_seconds_count",
            &["transport=\"grpc\""]
        )
        .unwrap()
            >= 2.0
    );
}

#[tokio::test]
async fn publish_refuses_clients_and_bad_batches() {
    let (node, _) = quiet_events().start_events();
    let st = EventServiceClient::new(node.channel().await)
        .publish(PublishRequest {
            events: vec![file_event("x", "k")],
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied);
    let mut bad = file_event("y", "k");
    bad.topic = "weather".into();
    let st = EventServiceClient::new(node.service_channel().await)
        .publish(PublishRequest {
            events: vec![file_event("z", "k"), bad],
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("unknown topic 'weather'"), "{}", st.message());
    let st = EventServiceClient::new(node.channel().await)
        .subscribe(SubscribeRequest {
            topics: vec!["weather".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    node.wait_metric("peervault_events_rejected_total", &["reason=\"unknown_topic\""], |v| {
        v == 1.0
    });
}

#[tokio::test]
async fn resume_after_a_disconnect_gets_exactly_the_missed_events() {
    let (node, _) = quiet_events().start_events();
    let mut sub = subscribe(&node, SubscribeRequest::default()).await;
    publish(&node, (1..=3).map(|i| file_event(&format!("a{i}"), "k")).collect()).await;
    let mut last = None;
    for want in 1..=3 {
        let e = next(&mut sub).await;
        assert_eq!(seq_of(&e), want);
        last = Some(e);
    }
    let last = last.unwrap();
    drop(sub);

    // Missed while away.
    publish(&node, (4..=7).map(|i| file_event(&format!("a{i}"), "k")).collect()).await;
    let mut sub = subscribe(
        &node,
        SubscribeRequest {
            since_sequence: Some(last.sequence),
            node: last.node.clone(),
            ..Default::default()
        },
    )
    .await;
    for want in 4..=7 {
        assert_eq!(seq_of(&next(&mut sub).await), want);
    }
    // Then live, with nothing doubled.
    publish(&node, vec![file_event("a8", "k")]).await;
    assert_eq!(seq_of(&next(&mut sub).await), 8);
    node.wait_metric("peervault_events_replayed_total", &[], |v| v == 4.0);
}

#[tokio::test]
async fn resume_older_than_the_buffer_is_told_where_replay_starts() {
    let (node, _) = NodeBuilder::new("events")
        .arg("--events-replay-buffer")
        .arg("5")
        .start_events();
    publish(&node, (1..=12).map(|i| file_event(&format!("b{i}"), "k")).collect()).await;
    let mut sub = subscribe(
        &node,
        SubscribeRequest {
            since_sequence: Some(2),
            ..Default::default()
        },
    )
    .await;
    let first = next(&mut sub).await;
    assert_eq!(first.r#type, "replay_start", "{first:?}");
    let Some(Payload::ReplayStart(r)) = first.payload else {
        panic!("{first:?}")
    };
    assert_eq!(r.first_available_sequence, 8);
    for want in 8..=12 {
        assert_eq!(seq_of(&next(&mut sub).await), want);
    }
}

#[tokio::test]
async fn a_stalled_subscriber_does_not_delay_a_fast_one() {
    let (node, http) = NodeBuilder::new("events")
        .arg("--events-subscriber-queue")
        .arg("256")
        .start_events_ws();
    // Never read: its transport buffers fill, then it falls behind the hub's ring.
    let mut stalled = subscribe(&node, SubscribeRequest::default()).await;
    let mut stalled_ws = ws_subscribed(&http, "file_operations").await;
    let mut fast = subscribe(&node, SubscribeRequest::default()).await;
    let pad = "x".repeat(4000);
    let total = 3000u64;
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    for batch in 0..(total / 50) {
        let events = (0..50)
            .map(|i| {
                let mut e = file_event(&format!("c{batch}-{i}"), "k");
                e.data_json = json!({"key": "k", "pad": pad}).to_string();
                e
            })
            .collect();
        let t = Instant::now();
        assert_eq!(publish(&node, events).await, 50);
        for i in 0..50 {
            let e = next(&mut fast).await;
            assert_eq!(
                e.sequence,
                batch * 50 + i + 1,
                "the fast subscriber lost or reordered events"
            );
        }
        worst = worst.max(t.elapsed());
    }
    assert!(
        started.elapsed() < WAIT,
        "publishing and fast delivery took {:?}",
        started.elapsed()
    );
    assert!(
        worst < Duration::from_secs(5),
        "one batch took {worst:?} to reach the fast subscriber"
    );

    // The stalled one is told what it missed, then continues with newer events.
    let mut saw_lag = None;
    let mut last = 0;
    while last < total {
        let e = next(&mut stalled).await;
        if let Some(Payload::Lagged(l)) = &e.payload {
            assert_eq!(e.r#type, "lagged");
            saw_lag = Some(l.missed);
            continue;
        }
        assert!(e.sequence > last);
        last = e.sequence;
    }
    let missed = saw_lag.expect("no lagged notice");
    assert!(missed > 0 && missed < total, "{missed}");
    node.wait_metric("peervault_events_lag_notices_total", &["transport=\"grpc\""], |v| {
        v >= 1.0
    });

    // The stalled WebSocket client likewise gets a lagged message (its socket buffers are large,
    // so it may instead have kept up); either way it is still served afterwards.
    let mut got_lagged = false;
    let mut events = 0u64;
    loop {
        let m = ws_next(&mut stalled_ws).await;
        match m["type"].as_str() {
            Some("lagged") => {
                assert!(m["data"]["missed"].as_u64().unwrap() > 0);
                got_lagged = true;
            }
            Some("file_uploaded") => {
                events += 1;
                if m["sequence"].as_u64() == Some(total) {
                    break;
                }
            }
            other => panic!("unexpected {other:?}: {m}"),
        }
    }
    assert!(
        got_lagged || events == total,
        "lost {} events without a lagged notice",
        total - events
    );
}

#[tokio::test]
async fn each_bad_websocket_input_is_answered_and_the_connection_survives() {
    let (node, http) = NodeBuilder::new("events")
        .arg("--ws-max-message-size")
        .arg("4096")
        .start_events_ws();
    let mut ws = ws_connect(&http).await;
    assert_eq!(ws_next(&mut ws).await["type"], "connected");
    let cases: [(Message, &str); 7] = [
        (Message::text("this is not json"), "not valid JSON"),
        (Message::text(r#"{"topic":"system"}"#), "no `type`"),
        (Message::text(r#"{"type":"dance"}"#), "unknown message type 'dance'"),
        (
            Message::text(r#"{"type":"subscribe","topic":"weather"}"#),
            "unknown topic 'weather'",
        ),
        (Message::text(r#"{"type":"subscribe"}"#), "`topic`"),
        (Message::text("[1,2,3]"), "JSON object"),
        (Message::binary(vec![1u8, 2, 3]), "binary"),
    ];
    for (msg, needle) in cases {
        ws.send(msg).await.unwrap();
        let e = ws_next(&mut ws).await;
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["data"]["code"], "INVALID_MESSAGE", "{e}");
        assert!(e["data"]["message"].as_str().unwrap().contains(needle), "{e}");
        assert!(e["timestamp"].is_string());
        // Still usable.
        ws_send(&mut ws, json!({"type": "ping"})).await;
        assert_eq!(ws_next(&mut ws).await["type"], "pong");
    }

    // Over the size limit: told so, then closed with 1009; the service keeps serving.
    ws.send(Message::text(format!(
        r#"{{"type":"ping","pad":"{}"}}"#,
        "x".repeat(5000)
    )))
    .await
    .unwrap();
    let e = ws_next(&mut ws).await;
    assert_eq!(e["data"]["code"], "INVALID_MESSAGE", "{e}");
    assert!(e["data"]["message"].as_str().unwrap().contains("4096"), "{e}");
    assert_eq!(ws_close_code(&mut ws).await, Some(1009));
    let _ = ws_subscribed(&http, "alerts").await;

    node.wait_metric("peervault_events_ws_errors_total", &["code=\"INVALID_MESSAGE\""], |v| {
        v == 8.0
    });
    node.wait_metric(
        "peervault_events_ws_rejects_total",
        &["reason=\"message_too_large\""],
        |v| v == 1.0,
    );
    node.wait_metric(
        "peervault_events_ws_messages_received_total",
        &["type=\"invalid\""],
        |v| v == 7.0,
    );
}

#[tokio::test]
async fn a_client_over_its_rate_is_told_when_to_retry() {
    let (_node, http) = NodeBuilder::new("events")
        .arg("--ws-messages-per-second")
        .arg("20")
        .start_events_ws();
    let mut ws = ws_connect(&http).await;
    assert_eq!(ws_next(&mut ws).await["type"], "connected");
    for _ in 0..40 {
        ws_send(&mut ws, json!({"type": "ping"})).await;
    }
    let mut pongs = 0;
    let err = loop {
        let m = ws_next(&mut ws).await;
        match m["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => break m,
            _ => panic!("{m}"),
        }
    };
    assert!(pongs <= 20, "{pongs} pongs");
    assert_eq!(err["data"]["code"], "RATE_LIMIT_EXCEEDED", "{err}");
    assert_eq!(
        err["data"]["message"],
        "Rate limit exceeded. Please slow down your requests."
    );
    let retry = err["data"]["retryAfter"].as_u64().expect("retryAfter");
    assert!((1..=60).contains(&retry), "{retry}");
    // After waiting as told, the same connection is served again.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    ws_send(&mut ws, json!({"type": "ping", "clientId": "after"})).await;
    loop {
        let m = ws_next(&mut ws).await;
        if m["type"] == "pong" && pongs >= 20 {
            break;
        }
        assert_ne!(m["type"], "error", "{m}");
        pongs += 1;
    }
}

#[tokio::test]
async fn connections_over_the_limit_and_foreign_origins_are_refused() {
    let (node, http) = NodeBuilder::new("events")
        .arg("--ws-max-connections")
        .arg("3")
        .arg("--ws-cors-origins")
        .arg("https://dash.example")
        .start_events_ws();
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(ws_subscribed(&http, "system").await);
    }
    // The 4th (with a limit of 3; 1001st with the default) is refused with CONNECTION_REFUSED.
    let mut extra = ws_connect(&http).await;
    let e = ws_next(&mut extra).await;
    assert_eq!(e["data"]["code"], "CONNECTION_REFUSED", "{e}");
    assert!(e["data"]["message"].as_str().unwrap().contains('3'), "{e}");
    assert_eq!(ws_close_code(&mut extra).await, Some(1013));
    // The open ones are unaffected.
    ws_send(&mut open[0], json!({"type": "ping"})).await;
    assert_eq!(ws_next(&mut open[0]).await["type"], "pong");
    // A slot freed is a slot usable.
    let mut gone = open.pop().unwrap();
    gone.close(None).await.unwrap();
    node.wait_metric("peervault_events_ws_connections", &[], |v| v == 2.0);
    open.push(ws_subscribed(&http, "system").await);
    node.wait_metric(
        "peervault_events_ws_rejects_total",
        &["reason=\"connection_limit\""],
        |v| v == 1.0,
    );

    drop(open);
    node.wait_metric("peervault_events_ws_connections", &[], |v| v == 0.0);
    // Origins: a listed one is admitted, another refused before the upgrade with 403.
    let mut ok = wss_connect(&http, &Cred::DevCert, Some("https://dash.example"))
        .await
        .unwrap();
    assert_eq!(ws_next(&mut ok).await["type"], "connected");
    match wss_connect(&http, &Cred::DevCert, Some("https://evil.example")).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["data"]["code"], "CONNECTION_REFUSED", "{body}");
            assert!(body["data"]["message"].as_str().unwrap().contains("evil.example"));
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    node.wait_metric(
        "peervault_events_ws_rejects_total",
        &["reason=\"origin_not_allowed\""],
        |v| v == 1.0,
    );
}

#[tokio::test]
async fn http_endpoints_report_health_metrics_and_status() {
    let (_node, http) = NodeBuilder::new("events")
        .arg("--ws-max-connections")
        .arg("7")
        .start_events_ws();
    let _ws = ws_subscribed(&http, "alerts").await;
    let (code, body) = https_get(&http, "/ws/health").await;
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "healthy");
    let (code, body) = https_get(&http, "/ws/status").await;
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["limits"]["maxConnections"], 7);
    assert_eq!(v["limits"]["maxMessageSize"], 1048576);
    assert_eq!(v["limits"]["messagesPerSecond"], 100);
    assert_eq!(v["timeouts"]["pingPeriod"], "54s");
    assert_eq!(v["timeouts"]["pongWait"], "1m");
    assert_eq!(v["subscriptions"]["alerts"], 1);
    assert_eq!(v["connections"], 1);
    let (code, body) = https_get(&http, "/ws/metrics").await;
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["connections"], 1);
    assert!(v["messagesReceived"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn an_upload_through_blob_reaches_grpc_and_websocket_subscribers() {
    let (node, http) = NodeBuilder::new("all").start_events_ws();
    let mut ws = ws_subscribed(&http, "file_operations").await;
    // The published stream, relayed by blob's PeerVaultService from the events service.
    let mut relayed = PeerVaultServiceClient::new(node.channel().await)
        .stream_file_operations(())
        .await
        .unwrap()
        .into_inner();
    let chunk = FileChunk {
        file_key: "docs/readme.txt".into(),
        data: b"hello events".to_vec().into(),
        offset: 0,
        is_last: true,
        ..Default::default()
    };
    FileServiceClient::new(node.channel().await)
        .upload_file(tokio_stream::iter([chunk]))
        .await
        .expect("upload");
    let m = ws_next(&mut ws).await;
    assert_eq!(m["type"], "file_uploaded", "{m}");
    assert_eq!(m["data"]["key"], "docs/readme.txt");
    assert_eq!(m["data"]["size"], 12);
    let f = next(&mut relayed).await;
    assert_eq!(
        (f.event_type.as_str(), f.file_key.as_str(), f.size),
        ("upload", "docs/readme.txt", 12)
    );
}

#[tokio::test]
async fn publishers_reconnect_after_an_events_pod_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("events");
    let port = free_port();
    let grpc = format!("127.0.0.1:{port}");
    let start_events = || {
        NodeBuilder::new("events")
            .data_dir(&dir)
            .start_listening(&grpc, "127.0.0.1:0")
            .0
    };
    let mut events = start_events();
    // A real peer process publishing its metrics events through the events client; it shares
    // the events pod's certificates, as pods of one cluster do.
    let peer_dir = tmp.path().join("peer");
    std::fs::create_dir_all(&peer_dir).unwrap();
    copy_dir(&dir.join("tls"), &peer_dir.join("tls"));
    let peer = NodeBuilder::new("peer")
        .data_dir(&peer_dir)
        .arg("--node-id")
        .arg("peer-x")
        .arg("--events-endpoint")
        .arg(&grpc)
        .arg("--metrics-interval")
        .arg("200ms")
        .start();
    let from_peer = || SubscribeRequest {
        topics: vec!["system".into()],
        types: vec!["system_metrics".into()],
        source: "peer/peer-x".into(),
        ..Default::default()
    };
    let mut sub = subscribe(&events, from_peer()).await;
    let e = next(&mut sub).await;
    let data: Value = serde_json::from_str(&e.data_json).unwrap();
    assert!(
        data["storage"].is_object() && data["network"].is_object() && data["performance"].is_object(),
        "{data}"
    );
    assert!(data["memory"]["residentBytes"].as_u64().unwrap() > 0, "{data}");
    let Some(Payload::System(s)) = &e.payload else {
        panic!("{e:?}")
    };
    assert_eq!(
        (s.event_type.as_str(), s.component.as_str()),
        ("system_metrics", "peer")
    );

    // The events pod goes away and comes back on the same address.
    events.signal("KILL");
    events.wait_exit(WAIT);
    drop(sub);
    let events = start_events();
    let mut sub = subscribe(&events, from_peer()).await;
    let e = next(&mut sub).await;
    assert_eq!(e.source, "peer/peer-x");
    assert!(e.sequence >= 1);
    peer.wait_metric("peervault_events_client_published_total", &["topic=\"system\""], |v| {
        v >= 8.0
    });
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

// Multi-threaded so the client's connection tasks keep running (and answer the server's
// GOAWAY) while the test thread waits for the process to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_websockets_and_ends_streams_then_exits_zero() {
    let (mut node, http) = quiet_events().start_events_ws();
    let mut ws = ws_subscribed(&http, "system").await;
    let mut sub = subscribe(&node, SubscribeRequest::default()).await;
    node.signal("TERM");
    assert_eq!(ws_close_code(&mut ws).await, Some(1001));
    let end = tokio::time::timeout(WAIT, sub.message())
        .await
        .expect("stream not ended");
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop(sub);
    let st = tokio::task::block_in_place(|| node.wait_exit(WAIT));
    assert!(st.success(), "{st:?}");
}

#[tokio::test]
async fn publishers_send_to_every_events_pod_listed_or_resolved() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, _) = quiet_events().data_dir(&tmp.path().join("a")).start_events();
    // Pods of one cluster share a CA: the second pod and the publisher use copies of the first's.
    for d in ["b", "p"] {
        copy_dir(&a.tls_dir(), &tmp.path().join(d).join("tls"));
    }
    let (b, _) = quiet_events().data_dir(&tmp.path().join("b")).start_events();
    // One by address, one by name (resolved through DNS, verified as `localhost`).
    let endpoints = format!("127.0.0.1:{},localhost:{}", a.grpc.port(), b.grpc.port());
    let peer = NodeBuilder::new("peer")
        .data_dir(&tmp.path().join("p"))
        .arg("--node-id")
        .arg("peer-y")
        .arg("--events-endpoint")
        .arg(&endpoints)
        .arg("--metrics-interval")
        .arg("200ms")
        .start();
    for node in [&a, &b] {
        let mut sub = subscribe(
            node,
            SubscribeRequest {
                types: vec!["storage_metrics".into()],
                source: "peer/peer-y".into(),
                ..Default::default()
            },
        )
        .await;
        let e = next(&mut sub).await;
        let data: Value = serde_json::from_str(&e.data_json).unwrap();
        assert!(
            data["totalSpace"].is_u64() && data["usagePercent"].is_number(),
            "{data}"
        );
    }
    peer.wait_metric("peervault_events_client_endpoints", &[], |v| v == 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_closed_after_the_pong_wait_and_answering_ones_stay() {
    let (node, http) = quiet_events()
        .arg("--ws-ping-period")
        .arg("200ms")
        .arg("--ws-pong-wait")
        .arg("600ms")
        .start_events_ws();
    let mut reading = ws_subscribed(&http, "system").await;
    let mut silent = ws_subscribed(&http, "system").await;
    // The reading client answers pings (tungstenite replies while reading) for 2 s.
    let reader = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_secs(2);
        let mut pings = 0;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match tokio::time::timeout(left, reading.next()).await {
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Ok(Some(Ok(Message::Close(f)))) => panic!("an answering client was closed: {f:?}"),
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!("{other:?}"),
                Err(_) => break,
            }
        }
        (reading, pings)
    });
    // The silent one sends nothing, not even pongs: once the server gives up on it, it finds a
    // close with 1001 (the server waits a moment for the closing handshake).
    tokio::task::block_in_place(|| {
        node.wait_metric("peervault_events_ws_rejects_total", &["reason=\"pong_timeout\""], |v| {
            v >= 1.0
        })
    });
    assert_eq!(ws_close_code(&mut silent).await, Some(1001));
    let (mut reading, pings) = reader.await.unwrap();
    assert!(pings >= 3, "{pings} pings in 2 s with a 200 ms period");
    ws_send(&mut reading, json!({"type": "ping"})).await;
    assert_eq!(ws_next(&mut reading).await["type"], "pong");
    assert_eq!(
        node.metric("peervault_events_ws_rejects_total", &["reason=\"pong_timeout\""]),
        Some(1.0)
    );
}
