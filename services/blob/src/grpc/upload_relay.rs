//! Relaying a resumed Graviton upload session to the pod that holds the upload: in a cluster a
//! Kubernetes Service sends a reconnecting client to any pod, while the upload's durable bytes
//! live on the pod that started it (its id names that pod).

use peervault_proto::v1::{
    UploadMessage, UploadResponse, upload_message::Message as In, upload_service_client::UploadServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status, Streaming};

use super::BlobApi;

/// Metadata header of a session relayed to the pod holding its upload: that pod serves it
/// itself (a relayed session is never relayed again).
pub(super) const RELAYED_HEADER: &str = "x-peervault-relayed-upload";

/// The member an upload id names as its holder (`None` for ids without one).
pub(super) fn holder_of(id: &str) -> Option<String> {
    let (_, tag) = id.split_once('.')?;
    if tag.is_empty() || tag.len() % 2 != 0 || tag.len() > 1024 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..tag.len())
        .step_by(2)
        .map(|i| tag.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    String::from_utf8(bytes?).ok()
}

/// What a session needs of its request to be relayed: the caller and the deadline.
pub(super) struct SessionOrigin {
    pub(super) caller: Option<peervault_runtime::Caller>,
    pub(super) timeout: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    pub(super) relayed: bool,
}

impl BlobApi {
    /// Relays a resumed session to `holder`, the pod its upload id names: the messages as they
    /// come, the replies as they go back, with the caller and the deadline of the original call.
    pub(super) async fn relay_session(
        &self,
        holder: &str,
        start: peervault_proto::v1::StartUpload,
        mut input: Streaming<UploadMessage>,
        out: &mpsc::Sender<Result<UploadResponse, Status>>,
        origin: &SessionOrigin,
    ) -> Result<(), Status> {
        let id = start.upload_id.clone();
        let counted = |result: &str| {
            self.cluster
                .metrics()
                .uploads_forwarded
                .with_label_values(&[result])
                .inc();
        };
        let Some(ch) = self.cluster.member_channel(holder) else {
            counted("error");
            return Err(Status::unavailable(format!(
                "upload '{id}' is held by pod {holder}, which is not in the membership now: resume it once that pod is back, or start a new upload"
            )));
        };
        tracing::info!(upload_id = %id, holder, "resumed upload relayed to the pod that holds it");
        let (tx, rx) = mpsc::channel::<UploadMessage>(4);
        let _ = tx
            .send(UploadMessage {
                message: Some(In::Start(start)),
            })
            .await;
        // The client's messages as they arrive; its end (or a broken stream) ends the relayed
        // stream, which leaves the upload resumable on the holder.
        let pump = tokio::spawn(async move {
            while let Ok(Some(m)) = input.message().await {
                if tx.send(m).await.is_err() {
                    break;
                }
            }
        });
        let mut req = Request::new(ReceiverStream::new(rx));
        req.metadata_mut()
            .insert(RELAYED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
        if let Some(t) = &origin.timeout {
            req.metadata_mut().insert("grpc-timeout", t.clone());
        }
        if let Some(c) = &origin.caller {
            peervault_runtime::auth::forward::attach(req.metadata_mut(), c);
        }
        let relayed = async {
            let mut replies = UploadServiceClient::new(ch)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX)
                .upload(req)
                .await?
                .into_inner();
            while let Some(m) = replies.message().await? {
                if out.send(Ok(m)).await.is_err() {
                    break;
                }
            }
            Ok::<(), Status>(())
        }
        .await;
        pump.abort();
        match relayed {
            Ok(()) => {
                counted("ok");
                Ok(())
            }
            Err(st) => {
                counted("error");
                tracing::info!(upload_id = %id, holder, code = ?st.code(), error = %st.message(), "relayed upload session ended with an error");
                if st.code() == tonic::Code::Unavailable {
                    return Err(Status::unavailable(format!(
                        "upload '{id}' is held by pod {holder}, which cannot be reached now ({}): retry later",
                        st.message()
                    )));
                }
                Err(st)
            }
        }
    }
}
