//! Races a client can drive from outside against the blob engine, through a real `peervault`
//! process: two streams on one resumable upload id.

mod common;

use std::collections::HashMap;

use bytes::Bytes;
use common::{NodeBuilder, WAIT};
use peervault_proto::v1::{
    CompleteUpload, FileChunk, StartUpload, UploadChunk, UploadMessage, UploadResponse,
    file_service_client::FileServiceClient, upload_message::Message as Up, upload_response::Response as Down,
    upload_service_client::UploadServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming, transport::Channel};

const CHUNK: usize = 64 * 1024;

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn start(total: usize, id: &str) -> UploadMessage {
    UploadMessage {
        message: Some(Up::Start(StartUpload {
            total_size: total as i64,
            attributes: HashMap::new(),
            upload_id: id.into(),
        })),
    }
}

fn chunk(offset: usize, d: &[u8]) -> UploadMessage {
    UploadMessage {
        message: Some(Up::Chunk(UploadChunk {
            data: Bytes::copy_from_slice(d),
            offset: offset as i64,
        })),
    }
}

fn complete() -> UploadMessage {
    UploadMessage {
        message: Some(Up::Complete(CompleteUpload::default())),
    }
}

/// An open upload stream: what to send and what comes back.
struct Session {
    tx: mpsc::Sender<UploadMessage>,
    rx: Streaming<UploadResponse>,
}

impl Session {
    async fn open(ch: &Channel, first: UploadMessage) -> Session {
        let (tx, rx) = mpsc::channel(8);
        tx.send(first).await.unwrap();
        let rx = UploadServiceClient::new(ch.clone())
            .upload(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Session { tx, rx }
    }

    /// The next acknowledgement (upload id, bytes).
    async fn ack(&mut self) -> Result<(String, u64), tonic::Status> {
        loop {
            match self.rx.message().await? {
                Some(UploadResponse {
                    response: Some(Down::Ack(a)),
                }) => return Ok((a.upload_id, a.received_bytes)),
                Some(_) => continue,
                None => return Err(tonic::Status::unknown("stream ended")),
            }
        }
    }

    /// Reads until the completion (blob key) or an error.
    async fn completion(&mut self) -> Result<Vec<u8>, tonic::Status> {
        loop {
            match self.rx.message().await? {
                Some(UploadResponse {
                    response: Some(Down::Complete(c)),
                }) => return Ok(c.key.to_vec()),
                Some(_) => continue,
                None => return Err(tonic::Status::unknown("stream ended without completion")),
            }
        }
    }
}

#[tokio::test]
async fn a_second_session_on_one_upload_id_ends_the_first_and_the_write_path_stays_up() {
    let node = NodeBuilder::new("all")
        .arg("--chunk-size")
        .arg(CHUNK.to_string())
        .start();
    let ch = node.channel().await;
    let content = data(7, 6 * CHUNK + 100);

    // Stream A: start, two durable chunks.
    let mut a = Session::open(&ch, start(content.len(), "")).await;
    let (id, _) = a.ack().await.unwrap();
    a.tx.send(chunk(0, &content[..2 * CHUNK])).await.unwrap();
    let (_, got) = a.ack().await.unwrap();
    assert_eq!(got, 2 * CHUNK as u64);

    // Stream B resumes the same id (it saw the two chunks), A keeps appending.
    let mut b = Session::open(&ch, start(content.len(), &id)).await;
    let (_, resumed) = b.ack().await.unwrap();
    assert_eq!(resumed, 2 * CHUNK as u64);
    // A is no longer the live session: its next append is refused and its stream ends.
    let _ = a.tx.send(chunk(2 * CHUNK, &content[2 * CHUNK..4 * CHUNK])).await;
    let err = tokio::time::timeout(WAIT, a.completion())
        .await
        .expect("the superseded stream must end")
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");

    // B finishes the content and completes.
    b.tx.send(chunk(2 * CHUNK, &content[2 * CHUNK..])).await.unwrap();
    b.tx.send(complete()).await.unwrap();
    let key = b.completion().await.unwrap();
    assert_eq!(key, blake3::hash(&content).as_bytes().to_vec());

    // The write path is still up and the process still ready.
    let r = FileServiceClient::new(ch.clone())
        .upload_file(tokio_stream::iter(vec![FileChunk {
            file_key: "after".into(),
            data: Bytes::from_static(b"still writable"),
            is_last: true,
            ..Default::default()
        }]))
        .await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(node.admin_get("/readyz").0, 200);
}

#[tokio::test]
async fn a_stale_session_completing_with_fewer_chunks_is_refused_not_a_panic() {
    let node = NodeBuilder::new("all")
        .arg("--chunk-size")
        .arg(CHUNK.to_string())
        .start();
    let ch = node.channel().await;
    let content = data(9, 5 * CHUNK);

    let mut a = Session::open(&ch, start(0, "")).await;
    let (id, _) = a.ack().await.unwrap();
    // B resumes before A has appended anything (its snapshot has no chunks).
    let mut b = Session::open(&ch, start(0, &id)).await;
    let (_, resumed) = b.ack().await.unwrap();
    assert_eq!(resumed, 0);
    // A (now stale) appends three chunks; whatever it is told, B then completes with two.
    let _ = a.tx.send(chunk(0, &content[..3 * CHUNK])).await;
    let _ = tokio::time::timeout(WAIT, a.ack())
        .await
        .expect("the stale stream answers");
    let tail = CHUNK + CHUNK / 2;
    b.tx.send(chunk(0, &content[..tail])).await.unwrap();
    b.tx.send(complete()).await.unwrap();
    let key = tokio::time::timeout(WAIT, b.completion())
        .await
        .expect("the live stream completes")
        .unwrap();
    assert_eq!(key, blake3::hash(&content[..tail]).as_bytes().to_vec());

    let r = FileServiceClient::new(ch.clone())
        .upload_file(tokio_stream::iter(vec![FileChunk {
            file_key: "after".into(),
            data: Bytes::from(data(1, 3 * CHUNK)),
            is_last: true,
            ..Default::default()
        }]))
        .await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(node.admin_get("/readyz").0, 200);
}
