//! Graviton API helpers shared by the single-pod and the cluster tests.

use std::collections::HashMap;

use bytes::Bytes;
use peervault_proto::v1::{
    StartUpload, UploadChunk, UploadMessage, UploadResponse, upload_message::Message as Up,
    upload_response::Response as Down, upload_service_client::UploadServiceClient,
};
use tonic::{Status, transport::Channel};

/// A Graviton upload: start, chunks, complete. Returns (key, acks seen).
pub async fn graviton_upload(
    ch: &Channel,
    content: &[u8],
    expected: Option<Vec<u8>>,
) -> Result<(Vec<u8>, Vec<u64>), Status> {
    let mut msgs = vec![UploadMessage {
        message: Some(Up::Start(StartUpload {
            total_size: content.len() as i64,
            attributes: HashMap::from([("content-type".into(), "application/x-test".into())]),
            upload_id: String::new(),
        })),
    }];
    for (i, c) in content.chunks(100_000).enumerate() {
        msgs.push(UploadMessage {
            message: Some(Up::Chunk(UploadChunk {
                data: Bytes::copy_from_slice(c),
                offset: (i * 100_000) as i64,
            })),
        });
    }
    msgs.push(UploadMessage {
        message: Some(Up::Complete(peervault_proto::v1::CompleteUpload {
            expected_hash: expected.map(Bytes::from).unwrap_or_default(),
        })),
    });
    let mut s = UploadServiceClient::new(ch.clone())
        .upload(tokio_stream::iter(msgs))
        .await?
        .into_inner();
    let mut acks = Vec::new();
    while let Some(UploadResponse { response }) = s.message().await? {
        match response {
            Some(Down::Ack(a)) => acks.push(a.received_bytes),
            Some(Down::Complete(c)) => return Ok((c.key.to_vec(), acks)),
            None => {}
        }
    }
    Err(Status::unknown("upload stream ended without completion"))
}

/// One Graviton upload session on `ch`: `start` (a new upload, or a resumed one when
/// `start.upload_id` is set), the bytes of `content` from where the server says to continue,
/// then complete. Returns the upload id the server gave (empty if it gave none) and the
/// outcome: the content key, or the status the stream ended with.
pub async fn graviton_session(ch: &Channel, content: &[u8], start: StartUpload) -> (String, Result<Vec<u8>, Status>) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let _ = tx
        .send(UploadMessage {
            message: Some(Up::Start(start)),
        })
        .await;
    let mut s = match UploadServiceClient::new(ch.clone())
        .upload(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(e) => return (String::new(), Err(e)),
    };
    let (id, from) = match s.message().await {
        Ok(Some(UploadResponse {
            response: Some(Down::Ack(a)),
        })) => (a.upload_id, a.received_bytes as usize),
        Ok(other) => {
            return (
                String::new(),
                Err(Status::unknown(format!("expected an ack, got {other:?}"))),
            );
        }
        Err(e) => return (String::new(), Err(e)),
    };
    for (i, c) in content.get(from..).unwrap_or_default().chunks(100_000).enumerate() {
        let _ = tx
            .send(UploadMessage {
                message: Some(Up::Chunk(UploadChunk {
                    data: Bytes::copy_from_slice(c),
                    offset: (from + i * 100_000) as i64,
                })),
            })
            .await;
    }
    let _ = tx
        .send(UploadMessage {
            message: Some(Up::Complete(peervault_proto::v1::CompleteUpload::default())),
        })
        .await;
    loop {
        match s.message().await {
            Ok(Some(UploadResponse {
                response: Some(Down::Complete(c)),
            })) => return (id, Ok(c.key.to_vec())),
            Ok(Some(_)) => {}
            Ok(None) => return (id, Err(Status::unknown("upload stream ended without completion"))),
            Err(e) => return (id, Err(e)),
        }
    }
}
