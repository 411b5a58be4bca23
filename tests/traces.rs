//! Traces seen from an OTLP receiver the test runs: an upload's event carries the upload's span
//! context (`traceparent`), the batched Publish spans (publisher and events service) link to it,
//! downloads and deletes are traced, and health probes never reach the exporter.

mod common;
#[path = "common/otlp.rs"]
mod otlp;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{NodeBuilder, WAIT};
use opentelemetry_proto::tonic::trace::v1::Span;
use otlp::hex;
use peervault_proto::v1::{
    FileChunk, FileRequest, SubscribeRequest, event_service_client::EventServiceClient,
    file_service_client::FileServiceClient,
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const SERVER: i32 = 2;
const PRODUCER: i32 = 4;

/// Waits until `pick` finds what it needs among the received spans.
async fn wait_for<T>(rx: &otlp::Receiver, what: &str, pick: impl Fn(&[(String, Span)]) -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        {
            let spans = rx.spans.lock().await;
            if let Some(t) = pick(&spans) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: never arrived; got {:?}",
                spans
                    .iter()
                    .map(|(s, sp)| (s.as_str(), sp.name.as_str()))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn server_span<'a>(spans: &'a [(String, Span)], name: &str) -> Option<&'a Span> {
    spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == name && s.kind == SERVER)
}

#[tokio::test]
async fn an_uploads_event_links_its_publish_spans_to_the_upload_and_probes_are_not_traced() {
    let (receiver, otlp_addr) = otlp::start().await;
    let node = NodeBuilder::new("all")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp_addr}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        // Probes of itself every 200 ms: plenty that must not be exported.
        .arg("--probe-interval")
        .arg("200ms")
        // The blob service's step spans are at debug level.
        .arg("--log")
        .arg("info,peervault_blob=debug")
        .start();
    let ch = node.channel().await;
    let mut sub = EventServiceClient::new(ch.clone())
        .subscribe(SubscribeRequest {
            topics: vec!["file_operations".into()],
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();

    let content = Bytes::from_static(b"a file worth tracing");
    FileServiceClient::new(ch.clone())
        .upload_file(tokio_stream::iter([FileChunk {
            file_key: "traced".into(),
            data: content.clone(),
            is_last: true,
            ..Default::default()
        }]))
        .await
        .expect("upload");
    let event = loop {
        let e = tokio::time::timeout(WAIT, sub.message())
            .await
            .expect("event stream stalled")
            .expect("event stream failed")
            .expect("event stream ended");
        if e.r#type == "file_uploaded" {
            break e;
        }
    };
    let mut parts = event.traceparent.split('-');
    let (version, trace_id, span_id, flags) = (parts.next(), parts.next(), parts.next(), parts.next());
    assert_eq!(
        (version, flags),
        (Some("00"), Some("01")),
        "traceparent {:?}",
        event.traceparent
    );
    let (trace_id, span_id) = (
        trace_id.unwrap_or_default().to_string(),
        span_id.unwrap_or_default().to_string(),
    );

    // The event's span is in the upload's trace.
    let upload = wait_for(&receiver, "UploadFile server span", |s| {
        server_span(s, "peervault.v1.FileService/UploadFile").cloned()
    })
    .await;
    assert_eq!(hex(&upload.trace_id), trace_id, "the event's trace is not the upload's");
    let origin = wait_for(&receiver, "the event's originating span", |s| {
        s.iter()
            .map(|(_, sp)| sp)
            .find(|sp| hex(&sp.span_id) == span_id)
            .cloned()
    })
    .await;
    assert_eq!(hex(&origin.trace_id), trace_id);

    // Both halves of the batched Publish are traces of their own that link to it.
    let links_to_event = |sp: &Span| {
        sp.links
            .iter()
            .any(|l| hex(&l.trace_id) == trace_id && hex(&l.span_id) == span_id)
    };
    let producer = wait_for(&receiver, "events.publish span linking the upload", |s| {
        s.iter()
            .map(|(_, sp)| sp)
            .find(|sp| sp.name == "events.publish" && sp.kind == PRODUCER && links_to_event(sp))
            .cloned()
    })
    .await;
    assert_ne!(
        hex(&producer.trace_id),
        trace_id,
        "a batch must not join one request's trace"
    );
    let publish = wait_for(&receiver, "EventService/Publish server span linking the upload", |s| {
        s.iter()
            .map(|(_, sp)| sp)
            .find(|sp| sp.name == "peervault.v1.EventService/Publish" && sp.kind == SERVER && links_to_event(sp))
            .cloned()
    })
    .await;
    assert_eq!(publish.trace_id, producer.trace_id, "Publish is the producer's child");

    // Downloads and deletes are traced too.
    let mut dl = FileServiceClient::new(ch.clone())
        .download_file(FileRequest {
            key: "traced".into(),
            ..Default::default()
        })
        .await
        .expect("download")
        .into_inner();
    let mut got = Vec::new();
    while let Some(chunk) = dl.message().await.expect("download stream") {
        got.extend_from_slice(&chunk.data);
    }
    assert_eq!(got, content);
    FileServiceClient::new(ch.clone())
        .delete_file(FileRequest {
            key: "traced".into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    wait_for(&receiver, "DownloadFile and DeleteFile server spans", |s| {
        (server_span(s, "peervault.v1.FileService/DownloadFile").is_some()
            && server_span(s, "peervault.v1.FileService/DeleteFile").is_some())
        .then_some(())
    })
    .await;

    // Health: the test's own checks and the peer service's probes (several by now) export nothing.
    for _ in 0..3 {
        HealthClient::new(ch.clone())
            .check(HealthCheckRequest { service: String::new() })
            .await
            .expect("health check");
    }
    node.wait_metric("peervault_peer_probes_total", &[], |v| v >= 5.0);
    // A span exported after the probes proves the exporter flushed past them.
    FileServiceClient::new(ch.clone())
        .get_file(FileRequest {
            key: "traced".into(),
            ..Default::default()
        })
        .await
        .expect_err("deleted");
    wait_for(&receiver, "GetFile after the probes", |s| {
        server_span(s, "peervault.v1.FileService/GetFile").map(|_| ())
    })
    .await;
    let spans = receiver.spans.lock().await;
    let probes: Vec<_> = spans
        .iter()
        .filter(|(_, s)| s.name.contains("grpc.health.v1.Health") || s.name == "peer_probe")
        .map(|(svc, s)| (svc.clone(), s.name.clone()))
        .collect();
    assert!(probes.is_empty(), "health probes were traced: {probes:?}");
}
