//! Streaming uploads and downloads with bounded memory, resumable uploads, and downloads that
//! resume where they stopped.

use std::{collections::HashMap, collections::VecDeque, path::Path, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use peervault_proto::v1::{
    ByteRange, CompleteUpload, FileChunk, FileRequest, FileResponse, GetBlobRequest, StartUpload, UploadChunk,
    UploadMessage, upload_message::Message as Up, upload_response::Response as Down,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::{Client, Error, error::is_retryable, hex};

/// Told the number of bytes transferred so far (cumulative).
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Told an upload id as soon as the server assigns it.
pub type UploadIdCallback = Arc<dyn Fn(&str) + Send + Sync>;

/// Size of each upload message (the protocol advises 64 KiB to 1 MiB).
const PIECE: usize = 256 * 1024;

/// Options of [`Client::put_file`].
#[derive(Clone, Default)]
pub struct PutOptions {
    /// Human-readable name; empty means the key's last path segment.
    pub name: Option<String>,
    /// MIME type; empty means `application/octet-stream`.
    pub content_type: Option<String>,
    /// User metadata.
    pub metadata: HashMap<String, String>,
    /// Told the bytes sent so far.
    pub progress: Option<Progress>,
    /// Lowercase hex BLAKE3 hash the whole content must have; default: the hash computed while
    /// reading (so a transfer error is caught). Setting it also catches an input that ends early.
    pub expected_hash: Option<String>,
}

/// Options of [`Client::upload_blob`].
#[derive(Clone)]
pub struct UploadOptions {
    /// Content length when known (checked by the server; lets it refuse an over-quota upload up
    /// front).
    pub total_size: Option<u64>,
    /// Attributes stored with the blob (`content-type` sets its content type).
    pub attributes: HashMap<String, String>,
    /// Resume this earlier upload: the reader must yield the same content from its start; the
    /// bytes the server already holds are read (and hashed) but not sent again. An unknown or
    /// expired id starts a new upload.
    pub resume_id: Option<String>,
    /// Most bytes sent but not yet acknowledged, kept to be resent after a reconnection. Must
    /// exceed the server's chunk size (1 MiB by default, at most 16 MiB).
    pub window: usize,
    /// Told the bytes acknowledged (durably stored) so far.
    pub progress: Option<Progress>,
    /// Told the upload id as soon as the server assigns it (persist it to resume after a crash).
    pub on_upload_id: Option<UploadIdCallback>,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            total_size: None,
            attributes: HashMap::new(),
            resume_id: None,
            window: 32 * 1024 * 1024,
            progress: None,
            on_upload_id: None,
        }
    }
}

/// The outcome of [`Client::upload_blob`].
#[derive(Debug, Clone)]
pub struct BlobUpload {
    /// The blob's key: the 32-byte BLAKE3 hash of its content.
    pub key: Vec<u8>,
    /// Content length in bytes.
    pub size: u64,
    /// The upload id used.
    pub upload_id: String,
    /// Bytes the server already held when this call started (resumed uploads), else 0.
    pub resumed_from: u64,
    /// Reconnections made during the upload.
    pub reconnects: u32,
}

/// The outcome of a download.
#[derive(Debug, Clone)]
pub struct Download {
    /// Bytes written.
    pub bytes: u64,
    /// Lowercase hex BLAKE3 hash of what was written.
    pub hash: String,
    /// Reconnections made during the download.
    pub reconnects: u32,
}

/// Reads up to `size` bytes, fewer only at the end of the input.
async fn read_piece<R: AsyncRead + Unpin>(reader: &mut R, size: usize) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(size);
    while buf.len() < size {
        if reader.read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    Ok(buf.freeze())
}

async fn next_msg<T>(stream: &mut tonic::Streaming<T>, idle: Duration) -> Result<Option<T>, Status> {
    match tokio::time::timeout(idle, stream.message()).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no message from the server within {idle:?}"
        ))),
    }
}

fn retryable(e: &Error) -> bool {
    match e {
        Error::Status(s) => is_retryable(s),
        Error::Unavailable { .. } => true,
        _ => false,
    }
}

impl Client {
    fn lift(&self, e: Error) -> Error {
        match e {
            Error::Status(s) => self.err(s),
            other => other,
        }
    }

    /// The one retry rule of the resuming transfers (upload_blob, get_file, get_blob): after a
    /// failure of `call`, how long to wait before continuing, or the error to give up with. An
    /// attempt that moved data (`progressed`) resets the count, so a long transfer over a
    /// flaky link keeps going as long as each connection makes progress.
    async fn pause_before_resuming(
        &self,
        call: &str,
        e: Error,
        progressed: bool,
        attempt: &mut u32,
        reconnects: &mut u32,
    ) -> Result<(), Error> {
        let policy = &self.config().retry;
        if !retryable(&e) {
            return Err(self.lift(e));
        }
        if progressed {
            *attempt = 0;
        }
        if *attempt >= policy.max_retries {
            return Err(self.lift(e));
        }
        *attempt += 1;
        *reconnects += 1;
        let d = policy.delay(*attempt);
        let status = match &e {
            Error::Status(s) => s.clone(),
            other => Status::unavailable(other.to_string()),
        };
        policy.note(call, *attempt, &status, d);
        tokio::time::sleep(d).await;
        Ok(())
    }

    /// Uploads a file under `key` from any reader, streaming it in 256 KiB messages with at
    /// most a few messages in memory, and checks the stored hash against the one computed while
    /// reading. Not retried (a reader cannot be replayed): use [`Client::put_path`] for a
    /// file on disk, or [`Client::upload_blob`] for a resumable upload. On any failure nothing
    /// is stored under the key.
    pub async fn put_file<R: AsyncRead + Unpin>(
        &self,
        key: &str,
        mut reader: R,
        opts: PutOptions,
    ) -> Result<FileResponse, Error> {
        let (tx, rx) = mpsc::channel::<FileChunk>(4);
        let mut files = self.files();
        let req = self.request(ReceiverStream::new(rx), false);
        let call = async move { files.upload_file(req).await };
        // The producer owns the sender: the request stream ends when it returns.
        let produce = async move {
            let mut offset = 0u64;
            let mut hasher = blake3::Hasher::new();
            let mut first = true;
            loop {
                let piece = match read_piece(&mut reader, PIECE).await {
                    Ok(p) => p,
                    Err(e) => {
                        // A chunk at an impossible offset makes the server abandon the upload,
                        // so a half-read input never becomes a (truncated) file.
                        let _ = tx
                            .send(FileChunk {
                                offset: -1,
                                ..Default::default()
                            })
                            .await;
                        return Err(Error::io("cannot read the input", e));
                    }
                };
                let last = piece.len() < PIECE;
                hasher.update(&piece);
                let len = piece.len() as u64;
                let mut chunk = FileChunk {
                    data: piece,
                    offset: offset as i64,
                    is_last: last,
                    ..Default::default()
                };
                if first {
                    chunk.file_key = key.to_string();
                    chunk.name = opts.name.clone().unwrap_or_default();
                    chunk.content_type = opts.content_type.clone().unwrap_or_default();
                    chunk.metadata = opts.metadata.clone();
                    first = false;
                }
                let hash = last.then(|| hasher.finalize().to_hex().to_string());
                if let Some(h) = &hash {
                    chunk.expected_hash = opts.expected_hash.clone().unwrap_or_else(|| h.clone());
                }
                offset += len;
                if tx.send(chunk).await.is_err() {
                    // The call ended early; its status says why.
                    return Ok(None);
                }
                if let Some(p) = &opts.progress {
                    p(offset);
                }
                if let Some(h) = hash {
                    return Ok(Some((h, offset)));
                }
            }
        };
        let (called, produced) = tokio::join!(call, produce);
        let produced = produced?;
        let file = called.map_err(|s| self.err(s))?.into_inner();
        if let Some((hash, size)) = produced
            && (file.hash != hash || file.size as u64 != size)
        {
            return Err(Error::Integrity(format!(
                "the server stored {} bytes hashing to {} but {size} bytes hashing to {hash} were sent",
                file.size, file.hash
            )));
        }
        Ok(file)
    }

    /// Uploads the file at `path` under `key` (see [`Client::put_file`]); a retryable failure
    /// (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) starts the upload again from the
    /// beginning of the file, with backoff.
    pub async fn put_path(&self, key: &str, path: &Path, opts: PutOptions) -> Result<FileResponse, Error> {
        let policy = &self.config().retry;
        let mut attempt = 0;
        loop {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
            match self
                .put_file(key, tokio::io::BufReader::with_capacity(PIECE, file), opts.clone())
                .await
            {
                Ok(f) => return Ok(f),
                Err(e) if retryable(&e) && attempt < policy.max_retries => {
                    attempt += 1;
                    let d = policy.delay(attempt);
                    policy.note("UploadFile", attempt, &Status::unavailable(e.to_string()), d);
                    tokio::time::sleep(d).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Uploads a blob through the resumable Graviton UploadService from any reader. Sent data
    /// is kept until the server acknowledges it as durable (at most `window` bytes, so memory
    /// stays bounded); after a retryable failure the upload continues on a new stream from the
    /// server's acknowledged offset. With `resume_id` it continues an upload begun earlier,
    /// even by another process. Returns the blob's content-addressed key.
    pub async fn upload_blob<R: AsyncRead + Unpin>(
        &self,
        mut reader: R,
        opts: UploadOptions,
    ) -> Result<BlobUpload, Error> {
        let idle = self.config().stream_idle_timeout;
        let window = opts.window.max(2 * PIECE) as u64;
        let mut id = opts.resume_id.clone();
        let mut base = 0u64; // bytes acknowledged; offset of buf's front
        let mut read_pos = 0u64; // bytes consumed from the reader
        let mut buf: VecDeque<(u64, Bytes)> = VecDeque::new();
        let mut eof = false;
        let mut hasher = blake3::Hasher::new();
        let mut digest: Option<blake3::Hash> = None;
        let mut attempt = 0u32;
        let mut reconnects = 0u32;
        let mut resumed_from: Option<u64> = None;

        loop {
            let (tx, rx) = mpsc::channel::<UploadMessage>(4);
            let start = UploadMessage {
                message: Some(Up::Start(StartUpload {
                    total_size: opts.total_size.unwrap_or(0) as i64,
                    attributes: opts.attributes.clone(),
                    upload_id: id.clone().unwrap_or_default(),
                })),
            };
            // The receiver is alive, so this cannot fail.
            let _ = tx.send(start).await;
            let progress_before = base;
            let outcome: Result<BlobUpload, Error> = async {
                let mut stream = self
                    .uploads()
                    .upload(self.request(ReceiverStream::new(rx), false))
                    .await
                    .map_err(Error::Status)?
                    .into_inner();
                let first = match next_msg(&mut stream, idle).await {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err(Error::Status(Status::unavailable("upload stream ended before its first ack"))),
                    Err(s) => return Err(Error::Status(s)),
                };
                let ack = match first.response {
                    Some(Down::Ack(a)) => a,
                    other => return Err(Error::Protocol(format!("expected an ack after start, got {other:?}"))),
                };
                if id.as_deref() != Some(ack.upload_id.as_str())
                    && let Some(cb) = &opts.on_upload_id
                {
                    cb(&ack.upload_id);
                }
                id = Some(ack.upload_id.clone());
                let held = ack.received_bytes;
                if held < base {
                    return Err(Error::Protocol(format!(
                        "the server holds {held} bytes of upload {} but had acknowledged {base}",
                        ack.upload_id
                    )));
                }
                if resumed_from.is_none() {
                    resumed_from = Some(held);
                }
                if held > read_pos {
                    // Resuming an upload begun by an earlier call: skip what the server holds.
                    let mut left = held - read_pos;
                    while left > 0 {
                        let piece = read_piece(&mut reader, left.min(PIECE as u64) as usize)
                            .await
                            .map_err(|e| Error::io("cannot read the input", e))?;
                        if piece.is_empty() {
                            return Err(Error::Config(format!(
                                "the input is shorter ({read_pos} bytes) than what upload {} already holds ({held} bytes); it is not the same content",
                                ack.upload_id
                            )));
                        }
                        hasher.update(&piece);
                        read_pos += piece.len() as u64;
                        left -= piece.len() as u64;
                    }
                    buf.clear();
                }
                trim(&mut buf, held);
                base = held;
                if let Some(p) = &opts.progress {
                    p(base);
                }
                let mut next_send = base;
                let mut complete_sent = false;
                loop {
                    let buffered = read_pos - base;
                    let can_send = !complete_sent && (next_send < read_pos || eof || buffered < window);
                    tokio::select! {
                        biased;
                        msg = stream.message() => match msg {
                            Ok(Some(m)) => match m.response {
                                Some(Down::Ack(a)) if a.received_bytes > base => {
                                    base = a.received_bytes.min(read_pos);
                                    trim(&mut buf, base);
                                    if let Some(p) = &opts.progress {
                                        p(base);
                                    }
                                }
                                Some(Down::Ack(_)) => {}
                                Some(Down::Complete(c)) => {
                                    let want = digest.map(|d| d.as_bytes().to_vec());
                                    if want.as_deref().is_some_and(|w| w != c.key.as_ref()) {
                                        return Err(Error::Integrity(format!(
                                            "the server stored blob {} but the content sent hashes to {}",
                                            hex(&c.key),
                                            want.as_deref().map(hex).unwrap_or_default()
                                        )));
                                    }
                                    return Ok(BlobUpload {
                                        key: c.key.to_vec(),
                                        size: c.size as u64,
                                        upload_id: ack.upload_id.clone(),
                                        resumed_from: resumed_from.unwrap_or(0),
                                        reconnects,
                                    });
                                }
                                None => {}
                            },
                            Ok(None) => return Err(Error::Status(Status::unavailable("upload stream ended before completion"))),
                            Err(s) => return Err(Error::Status(s)),
                        },
                        permit = tx.reserve(), if can_send => {
                            let Ok(permit) = permit else {
                                return Err(Error::Status(Status::unavailable("upload stream closed")));
                            };
                            if next_send < read_pos {
                                let piece = slice_at(&buf, next_send);
                                let len = piece.len() as u64;
                                permit.send(chunk_msg(piece, next_send));
                                next_send += len;
                            } else if !eof {
                                let piece = read_piece(&mut reader, PIECE)
                                    .await
                                    .map_err(|e| Error::io("cannot read the input", e))?;
                                if piece.len() < PIECE {
                                    eof = true;
                                }
                                if piece.is_empty() {
                                    // Nothing to send; the next round sends `complete`.
                                    drop(permit);
                                } else {
                                    hasher.update(&piece);
                                    let len = piece.len() as u64;
                                    buf.push_back((read_pos, piece.clone()));
                                    permit.send(chunk_msg(piece, read_pos));
                                    read_pos += len;
                                    next_send = read_pos;
                                }
                                if eof {
                                    digest = Some(hasher.finalize());
                                }
                            } else {
                                let expected = digest.map(|d| Bytes::copy_from_slice(d.as_bytes())).unwrap_or_default();
                                permit.send(UploadMessage { message: Some(Up::Complete(CompleteUpload { expected_hash: expected })) });
                                complete_sent = true;
                            }
                        }
                        _ = tokio::time::sleep(idle) => {
                            return Err(Error::Status(Status::deadline_exceeded(format!(
                                "no acknowledgement from the server within {idle:?} (is the server's chunk size larger than the upload window?)"
                            ))));
                        }
                    }
                }
            }
            .await;
            match outcome {
                Ok(done) => return Ok(done),
                // The upload id is unknown: expired, or completed by an earlier attempt whose
                // answer was lost.
                Err(Error::Status(s)) if s.code() == Code::NotFound && id.is_some() => {
                    if let Some(d) = digest
                        && let Ok(meta) = self.stat_blob(d.as_bytes()).await
                        && meta.size as u64 == read_pos
                    {
                        return Ok(BlobUpload {
                            key: d.as_bytes().to_vec(),
                            size: read_pos,
                            upload_id: id.unwrap_or_default(),
                            resumed_from: resumed_from.unwrap_or(0),
                            reconnects,
                        });
                    }
                    if read_pos == 0 {
                        tracing::info!(upload_id = ?id, "upload to resume is unknown or expired; starting a new one");
                        id = None;
                        resumed_from = None;
                        continue;
                    }
                    return Err(self.err(s));
                }
                Err(e) => {
                    self.pause_before_resuming("Upload", e, base > progress_before, &mut attempt, &mut reconnects)
                        .await?
                }
            }
        }
    }

    /// Downloads a file into any writer, checking each chunk's and the whole file's BLAKE3
    /// hash. After a retryable failure it continues from the byte it reached (DownloadFile
    /// from an offset, for the content it started with), so a restarted server costs no
    /// repeated transfer.
    pub async fn get_file<W: AsyncWrite + Unpin>(
        &self,
        key: &str,
        mut writer: W,
        progress: Option<Progress>,
    ) -> Result<Download, Error> {
        let info = self.stat(key).await?;
        let idle = self.config().stream_idle_timeout;
        let mut written = 0u64;
        let mut hasher = blake3::Hasher::new();
        let mut attempt = 0;
        let mut reconnects = 0;
        loop {
            let before = written;
            let r: Result<(), Error> = async {
                // Every attempt continues at the byte reached and insists on the content the
                // stat saw, so a file replaced meanwhile fails fast instead of splicing two
                // versions. Through DownloadFile (not GetBlob by content key) a
                // key-prefix-limited caller can resume too.
                let req = FileRequest {
                    key: key.to_string(),
                    offset: written as i64,
                    expected_hash: info.hash.clone(),
                };
                let mut s = self
                    .files()
                    .download_file(self.request(req, false))
                    .await
                    .map_err(Error::Status)?
                    .into_inner();
                while let Some(m) = next_msg(&mut s, idle).await.map_err(Error::Status)? {
                    if m.offset as u64 != written {
                        return Err(Error::Protocol(format!(
                            "chunk at offset {} but {written} bytes were received",
                            m.offset
                        )));
                    }
                    if !m.checksum.is_empty() && blake3::hash(&m.data).to_hex().as_str() != m.checksum {
                        return Err(Error::Integrity(format!(
                            "the chunk at offset {} does not match its checksum",
                            m.offset
                        )));
                    }
                    write(&mut writer, &m.data, &mut hasher, &mut written, &progress).await?;
                }
                Ok(())
            }
            .await;
            match r {
                Ok(()) => break,
                Err(e) => {
                    self.pause_before_resuming("DownloadFile", e, written > before, &mut attempt, &mut reconnects)
                        .await?
                }
            }
        }
        writer
            .flush()
            .await
            .map_err(|e| Error::io("cannot write the output", e))?;
        let hash = hasher.finalize().to_hex().to_string();
        if written != info.size as u64 || hash != info.hash {
            return Err(Error::Integrity(format!(
                "received {written} bytes hashing to {hash}, but the file is {} bytes hashing to {} (it may have been replaced during the download; try again)",
                info.size, info.hash
            )));
        }
        Ok(Download {
            bytes: written,
            hash,
            reconnects,
        })
    }

    /// Downloads a blob, or the byte range `start..end` of it (`end` exclusive, `None` for the
    /// end of the blob), into any writer, resuming after retryable failures. A whole blob is
    /// checked against its key (its BLAKE3 hash).
    pub async fn get_blob<W: AsyncWrite + Unpin>(
        &self,
        key: &[u8],
        range: Option<(u64, Option<u64>)>,
        mut writer: W,
        progress: Option<Progress>,
    ) -> Result<Download, Error> {
        let idle = self.config().stream_idle_timeout;
        let start = range.map(|r| r.0).unwrap_or(0);
        let end = range.and_then(|r| r.1);
        let mut written = 0u64;
        let mut hasher = blake3::Hasher::new();
        let mut attempt = 0;
        let mut reconnects = 0;
        loop {
            let before = written;
            let r: Result<(), Error> = async {
                let req = GetBlobRequest {
                    key: Bytes::copy_from_slice(key),
                    range: (range.is_some() || written > 0).then(|| ByteRange {
                        start: (start + written) as i64,
                        end: end.map(|e| e as i64),
                    }),
                };
                let mut s = self
                    .blobs()
                    .get_blob(self.request(req, false))
                    .await
                    .map_err(Error::Status)?
                    .into_inner();
                while let Some(m) = next_msg(&mut s, idle).await.map_err(Error::Status)? {
                    if m.offset as u64 != start + written {
                        return Err(Error::Protocol(format!(
                            "chunk at offset {} but {} was expected",
                            m.offset,
                            start + written
                        )));
                    }
                    write(&mut writer, &m.data, &mut hasher, &mut written, &progress).await?;
                }
                Ok(())
            }
            .await;
            match r {
                Ok(()) => break,
                Err(e) => {
                    self.pause_before_resuming("GetBlob", e, written > before, &mut attempt, &mut reconnects)
                        .await?
                }
            }
        }
        writer
            .flush()
            .await
            .map_err(|e| Error::io("cannot write the output", e))?;
        let hash = hasher.finalize();
        if range.is_none() {
            let want = parse_blob_key(key);
            if want.is_some_and(|w| w != *hash.as_bytes()) {
                return Err(Error::Integrity(format!(
                    "blob {} arrived with content hashing to {}",
                    hex(&want.unwrap_or_default()),
                    hash.to_hex()
                )));
            }
        }
        Ok(Download {
            bytes: written,
            hash: hash.to_hex().to_string(),
            reconnects,
        })
    }
}

/// A blob key as 32 raw bytes, from raw bytes or the 64-character hex form.
pub(crate) fn parse_blob_key(key: &[u8]) -> Option<[u8; 32]> {
    if key.len() == 32 {
        return key.try_into().ok();
    }
    if key.len() == 64 {
        let s = std::str::from_utf8(key).ok()?;
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        return Some(out);
    }
    None
}

async fn write<W: AsyncWrite + Unpin>(
    writer: &mut W,
    data: &[u8],
    hasher: &mut blake3::Hasher,
    written: &mut u64,
    progress: &Option<Progress>,
) -> Result<(), Error> {
    writer
        .write_all(data)
        .await
        .map_err(|e| Error::io("cannot write the output", e))?;
    hasher.update(data);
    *written += data.len() as u64;
    if let Some(p) = progress {
        p(*written);
    }
    Ok(())
}

fn chunk_msg(data: Bytes, offset: u64) -> UploadMessage {
    UploadMessage {
        message: Some(Up::Chunk(UploadChunk {
            data,
            offset: offset as i64,
        })),
    }
}

/// Drops buffered bytes below `upto` (they are acknowledged).
fn trim(buf: &mut VecDeque<(u64, Bytes)>, upto: u64) {
    while let Some((off, data)) = buf.front_mut() {
        let end = *off + data.len() as u64;
        if end <= upto {
            buf.pop_front();
        } else {
            if *off < upto {
                let cut = (upto - *off) as usize;
                *data = data.slice(cut..);
                *off = upto;
            }
            break;
        }
    }
}

/// The buffered bytes from `offset` to the end of the piece that holds it.
fn slice_at(buf: &VecDeque<(u64, Bytes)>, offset: u64) -> Bytes {
    for (off, data) in buf {
        let end = *off + data.len() as u64;
        if *off <= offset && offset < end {
            return data.slice((offset - off) as usize..);
        }
    }
    Bytes::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimming_and_slicing_the_unacknowledged_buffer() {
        let mut buf: VecDeque<(u64, Bytes)> = VecDeque::new();
        buf.push_back((0, Bytes::from_static(b"abcd")));
        buf.push_back((4, Bytes::from_static(b"efgh")));
        assert_eq!(slice_at(&buf, 2), Bytes::from_static(b"cd"));
        assert_eq!(slice_at(&buf, 5), Bytes::from_static(b"fgh"));
        trim(&mut buf, 5);
        assert_eq!(buf.len(), 1);
        assert_eq!(buf[0], (5, Bytes::from_static(b"fgh")));
        trim(&mut buf, 8);
        assert!(buf.is_empty());
    }

    #[test]
    fn blob_keys_parse_from_raw_or_hex() {
        let h = blake3::hash(b"x");
        assert_eq!(parse_blob_key(h.as_bytes()), Some(*h.as_bytes()));
        assert_eq!(parse_blob_key(h.to_hex().as_bytes()), Some(*h.as_bytes()));
        assert_eq!(parse_blob_key(b"short"), None);
    }

    #[tokio::test]
    async fn pieces_are_full_until_the_end() {
        let data = vec![7u8; PIECE + 10];
        let mut r = &data[..];
        assert_eq!(read_piece(&mut r, PIECE).await.unwrap().len(), PIECE);
        assert_eq!(read_piece(&mut r, PIECE).await.unwrap().len(), 10);
        assert_eq!(read_piece(&mut r, PIECE).await.unwrap().len(), 0);
    }
}
