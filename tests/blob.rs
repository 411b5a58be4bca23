//! Blob service through real `peervault` processes over mutual TLS: round trips, ranges,
//! deduplication, pagination, resumable uploads, crash recovery, integrity, concurrency, and
//! every kind of bad input with its status and stored data left as it was.

mod common;

use std::{collections::HashMap, path::Path};

use bytes::Bytes;
use common::{Node, NodeBuilder, WAIT, graviton::graviton_upload};
use peervault_proto::v1::{
    ByteRange, DeleteBlobRequest, FileChunk, FileRequest, GetBlobRequest, ListBlobsRequest, ListFilesRequest,
    StartUpload, StatBlobRequest, UpdateFileMetadataRequest, UploadChunk, UploadMessage, UploadResponse,
    blob_service_client::BlobServiceClient, file_service_client::FileServiceClient,
    peer_vault_service_client::PeerVaultServiceClient, upload_message::Message as Up,
    upload_response::Response as Down, upload_service_client::UploadServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, transport::Channel};

const SMALL_CHUNK: usize = 64 * 1024;

fn data(seed: u64, len: usize) -> Vec<u8> {
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

fn small_chunk_node() -> Node {
    NodeBuilder::new("all")
        .arg("--chunk-size")
        .arg(SMALL_CHUNK.to_string())
        .start()
}

fn chunks_of(key: &str, content: &[u8], piece: usize) -> Vec<FileChunk> {
    let mut v: Vec<FileChunk> = content
        .chunks(piece.max(1))
        .enumerate()
        .map(|(i, c)| FileChunk {
            file_key: key.into(),
            data: Bytes::copy_from_slice(c),
            offset: (i * piece) as i64,
            ..Default::default()
        })
        .collect();
    match v.last_mut() {
        Some(last) => last.is_last = true,
        None => v.push(FileChunk {
            file_key: key.into(),
            is_last: true,
            ..Default::default()
        }),
    }
    v
}

async fn upload(ch: &Channel, key: &str, content: &[u8]) -> Result<peervault_proto::v1::FileResponse, Status> {
    upload_msgs(ch, chunks_of(key, content, 256 * 1024)).await
}

async fn upload_msgs(ch: &Channel, msgs: Vec<FileChunk>) -> Result<peervault_proto::v1::FileResponse, Status> {
    let r = FileServiceClient::new(ch.clone())
        .upload_file(tokio_stream::iter(msgs))
        .await?;
    Ok(r.into_inner())
}

/// ListFiles' `total` for the whole store.
async fn listed_total(ch: &Channel) -> i32 {
    FileServiceClient::new(ch.clone())
        .list_files(ListFilesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .total
}

async fn download(ch: &Channel, key: &str) -> Result<Vec<u8>, Status> {
    download_from(ch, key, 0, "").await
}

/// DownloadFile from byte `offset`, expecting content `hash` (empty: any); checks offsets,
/// per-chunk checksums and the closing `is_last`.
async fn download_from(ch: &Channel, key: &str, offset: i64, hash: &str) -> Result<Vec<u8>, Status> {
    let mut s = FileServiceClient::new(ch.clone())
        .download_file(FileRequest {
            key: key.into(),
            offset,
            expected_hash: hash.into(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    let mut saw_last = false;
    while let Some(m) = s.message().await? {
        assert_eq!(m.offset, offset + out.len() as i64, "offsets must be contiguous");
        assert!(!saw_last, "message after is_last");
        if !m.checksum.is_empty() {
            assert_eq!(m.checksum, blake3::hash(&m.data).to_hex().to_string());
        }
        out.extend_from_slice(&m.data);
        saw_last = m.is_last;
    }
    assert!(saw_last, "download ended without is_last");
    Ok(out)
}

async fn get_blob(ch: &Channel, key: &[u8], range: Option<(i64, Option<i64>)>) -> Result<Vec<u8>, Status> {
    let mut s = BlobServiceClient::new(ch.clone())
        .get_blob(GetBlobRequest {
            key: Bytes::copy_from_slice(key),
            range: range.map(|(start, end)| ByteRange { start, end }),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    let first = range.map(|r| r.0).unwrap_or(0);
    while let Some(m) = s.message().await? {
        assert_eq!(m.offset, first + out.len() as i64);
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

/// Unique chunks the store holds (its index's count).
fn stored_chunks(node: &Node) -> usize {
    node.metric("peervault_blob_chunks", &[]).unwrap_or(0.0) as usize
}

/// Bytes in the segment files (where uploaded chunks are appended).
fn segment_bytes(data_dir: &Path) -> u64 {
    std::fs::read_dir(data_dir.join("blob/segments"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Flips one bit of the stored bytes that start with `needle` (in a segment file).
fn flip_stored_byte(data_dir: &Path, needle: &[u8], at: usize) {
    for e in std::fs::read_dir(data_dir.join("blob/segments")).unwrap() {
        let path = e.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(pos) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[pos + at] ^= 0x40;
            std::fs::write(&path, bytes).unwrap();
            return;
        }
    }
    panic!("stored bytes not found");
}

fn tmp_files(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("blob/tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn files_round_trip_at_every_size_boundary() {
    let node = small_chunk_node();
    let ch = node.channel().await;
    for (i, len) in [0, 1, SMALL_CHUNK, SMALL_CHUNK + 1, 3 * SMALL_CHUNK + 17]
        .into_iter()
        .enumerate()
    {
        let content = data(i as u64, len);
        let key = format!("dir/file-{len}.bin");
        let r = upload(&ch, &key, &content).await.unwrap();
        assert_eq!(r.size as usize, len);
        assert_eq!(r.hash, blake3::hash(&content).to_hex().to_string());
        assert_eq!(r.name, format!("file-{len}.bin"));
        assert_eq!(r.replicas.len(), 1);
        assert_eq!(download(&ch, &key).await.unwrap(), content, "size {len}");
        // A file's hash is a blob key that GetBlob serves.
        assert_eq!(get_blob(&ch, r.hash.as_bytes(), None).await.unwrap(), content);
        let got = FileServiceClient::new(ch.clone())
            .get_file(FileRequest {
                key: key.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.content_type, "application/octet-stream");
        assert_eq!(got.hash, r.hash);
    }
    // PeerVaultService serves the same files with the same code.
    let pv = PeerVaultServiceClient::new(ch.clone())
        .get_file(FileRequest {
            key: "dir/file-1.bin".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pv.size, 1);
    assert_eq!(tmp_files(&node.data_dir), 0);
}

#[tokio::test]
async fn a_100_mib_file_round_trips_with_the_default_chunk_size() {
    let node = Node::start("all");
    let ch = node.channel().await;
    let content = data(42, 100 * 1024 * 1024);
    let r = upload(&ch, "big.bin", &content).await.unwrap();
    assert_eq!(r.size as usize, content.len());
    let back = download(&ch, "big.bin").await.unwrap();
    assert!(back == content, "100 MiB content differs after the round trip");
    let (key, acks) = graviton_upload(&ch, &content, Some(blake3::hash(&content).as_bytes().to_vec()))
        .await
        .unwrap();
    assert_eq!(key, blake3::hash(&content).as_bytes().to_vec());
    assert!(acks.len() >= 3, "acks arrive as chunks become durable: {}", acks.len());
    assert!(acks.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(*acks.last().unwrap(), content.len() as u64);
    // Same content again: stored once.
    assert_eq!(stored_chunks(&node), 100);
    assert!(segment_bytes(&node.data_dir) <= 101 * 1024 * 1024);
}

#[tokio::test]
async fn ranged_blob_reads_at_boundaries() {
    let node = small_chunk_node();
    let ch = node.channel().await;
    let c = SMALL_CHUNK as i64;
    let content = data(7, 3 * SMALL_CHUNK + 100);
    let (key, _) = graviton_upload(&ch, &content, None).await.unwrap();
    let len = content.len() as i64;
    for (start, end) in [
        (0, Some(1)),
        (0, Some(c)),
        (c - 1, Some(c + 1)),
        (c, Some(2 * c)),
        (c + 5, None),
        (len - 1, None),
        (len, None),
        (0, None),
        (5, Some(5)),
    ] {
        let got = get_blob(&ch, &key, Some((start, end))).await.unwrap();
        let e = end.unwrap_or(len) as usize;
        assert_eq!(got, content[start as usize..e], "range {start}..{end:?}");
    }
    let st = get_blob(&ch, &key, Some((len + 1, None))).await.unwrap_err();
    assert_eq!(st.code(), Code::OutOfRange, "{st:?}");
    let st = get_blob(&ch, &key, Some((0, Some(len + 1)))).await.unwrap_err();
    assert_eq!(st.code(), Code::OutOfRange);
    let st = get_blob(&ch, &key, Some((10, Some(5)))).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    let meta = BlobServiceClient::new(ch.clone())
        .stat_blob(StatBlobRequest {
            key: Bytes::from(key.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.size, len);
    assert_eq!(meta.content_type, "application/x-test");
}

/// A download that continues (issue 11, defect 5): DownloadFile from an offset inside a chunk,
/// at a chunk boundary and at the end, for chunked and small inline files; a negative offset, one
/// past the end and content that changed are refused and leave the file as it was.
#[tokio::test]
async fn download_file_continues_from_an_offset_and_refuses_bad_offsets_and_replaced_content() {
    let node = small_chunk_node();
    let ch = node.channel().await;
    let c = SMALL_CHUNK as i64;
    let big = data(11, 3 * SMALL_CHUNK + 100);
    let small = b"small inline content".to_vec();
    let big_hash = upload(&ch, "dl/big", &big).await.unwrap().hash;
    let small_hash = upload(&ch, "dl/small", &small).await.unwrap().hash;
    let len = big.len() as i64;
    for offset in [0, 1, c - 1, c, c + 5, 2 * c, len - 1, len] {
        let got = download_from(&ch, "dl/big", offset, &big_hash).await.unwrap();
        assert!(got == big[offset as usize..], "offset {offset}");
        // The hash is optional and case-insensitive.
        let got = download_from(&ch, "dl/big", offset, &big_hash.to_uppercase())
            .await
            .unwrap();
        assert!(got == big[offset as usize..], "offset {offset}");
    }
    for offset in [0, 5, small.len() as i64] {
        let got = download_from(&ch, "dl/small", offset, "").await.unwrap();
        assert_eq!(got, small[offset as usize..], "offset {offset}");
    }
    let st = download_from(&ch, "dl/big", len + 1, "").await.unwrap_err();
    assert_eq!(st.code(), Code::OutOfRange, "{st:?}");
    assert!(st.message().contains("past the end"), "{st:?}");
    let st = download_from(&ch, "dl/small", small.len() as i64 + 1, "")
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::OutOfRange, "{st:?}");
    let st = download_from(&ch, "dl/big", -1, "").await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    // A resumed download of a file replaced meanwhile fails fast instead of splicing versions.
    let st = download_from(&ch, "dl/big", c, &small_hash).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("replaced"), "{st:?}");
    let st = download_from(&ch, "dl/missing", 0, "").await.unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    // Nothing refused changed what is stored.
    assert!(download(&ch, "dl/big").await.unwrap() == big);
    assert_eq!(download(&ch, "dl/small").await.unwrap(), small);
}

#[tokio::test]
async fn equal_content_under_two_keys_is_one_copy_on_disk() {
    let node = small_chunk_node();
    let ch = node.channel().await;
    let content = data(3, 4 * SMALL_CHUNK);
    let a = upload(&ch, "a", &content).await.unwrap();
    let b = upload(&ch, "b", &content).await.unwrap();
    assert_eq!(a.hash, b.hash);
    assert_eq!(stored_chunks(&node), 4);
    // The second upload appended nothing that stays (a given-back chunk at most).
    assert!(segment_bytes(&node.data_dir) <= 5 * SMALL_CHUNK as u64);
    assert_eq!(
        node.metric("peervault_blob_storage_used_bytes", &[]),
        Some(content.len() as f64)
    );
    assert_eq!(node.metric("peervault_blob_dedup_ratio", &[]), Some(2.0));
    // DeleteBlob refuses while files use the content.
    let st = BlobServiceClient::new(ch.clone())
        .delete_blob(DeleteBlobRequest {
            key: Bytes::from(a.hash.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    FileServiceClient::new(ch.clone())
        .delete_file(FileRequest {
            key: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(download(&ch, "b").await.unwrap(), content);
    let st = download(&ch, "a").await.unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
}

#[tokio::test]
async fn pagination_over_1000_files_is_stable_and_complete() {
    let node = Node::start("all");
    let ch = node.channel().await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            for i in (t..1000).step_by(8) {
                upload(&ch, &format!("p/{i:04}"), format!("file {i}").as_bytes())
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    upload(&ch, "q/other", b"x").await.unwrap();
    let mut c = FileServiceClient::new(ch.clone());
    let mut seen = Vec::new();
    let mut token = String::new();
    for page in 0.. {
        assert!(page < 20, "too many pages");
        let r = c
            .list_files(ListFilesRequest {
                prefix: "p/".into(),
                page_size: 100,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.total, 1000);
        seen.extend(r.files.into_iter().map(|f| f.key));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    let expected: Vec<String> = (0..1000).map(|i| format!("p/{i:04}")).collect();
    assert_eq!(seen, expected);
    // The published page numbers work too.
    let r = c
        .list_files(ListFilesRequest {
            prefix: "p/".into(),
            page: 3,
            page_size: 50,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.files.first().map(|f| f.key.as_str()), Some("p/0100"));
    let st = c
        .list_files(ListFilesRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    // Small objects go through group commit: many operations per index transaction.
    let commits = node.metric("peervault_blob_commit_batch_size_count", &[]).unwrap();
    assert!(
        commits < 1001.0,
        "expected grouped commits, got {commits} transactions for 1001 files"
    );
}

#[tokio::test]
async fn a_dropped_upload_resumes_from_the_last_acknowledged_byte() {
    let node = small_chunk_node();
    let ch = node.channel().await;
    let content = data(11, 5 * SMALL_CHUNK + 123);
    let (tx, rx) = mpsc::channel(8);
    tx.send(UploadMessage {
        message: Some(Up::Start(StartUpload {
            total_size: content.len() as i64,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut s = UploadServiceClient::new(ch.clone())
        .upload(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let Some(Down::Ack(first)) = s.message().await.unwrap().unwrap().response else {
        panic!("expected ack")
    };
    assert_eq!(first.received_bytes, 0);
    let id = first.upload_id.clone();
    // Send 2.5 chunks, wait for the acknowledgement of 2, then drop the stream.
    let sent = 2 * SMALL_CHUNK + SMALL_CHUNK / 2;
    tx.send(UploadMessage {
        message: Some(Up::Chunk(UploadChunk {
            data: Bytes::copy_from_slice(&content[..sent]),
            offset: 0,
        })),
    })
    .await
    .unwrap();
    let mut acked = 0;
    while acked < 2 * SMALL_CHUNK as u64 {
        match s.message().await.unwrap().unwrap().response {
            Some(Down::Ack(a)) => acked = a.received_bytes,
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(tx);
    drop(s);

    // Resume: the server says where to continue.
    let (tx, rx) = mpsc::channel(8);
    tx.send(UploadMessage {
        message: Some(Up::Start(StartUpload {
            upload_id: id.clone(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut s = UploadServiceClient::new(ch.clone())
        .upload(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let Some(Down::Ack(resume)) = s.message().await.unwrap().unwrap().response else {
        panic!("expected ack")
    };
    assert_eq!(resume.upload_id, id);
    assert_eq!(resume.received_bytes, 2 * SMALL_CHUNK as u64);
    let from = resume.received_bytes as usize;
    tx.send(UploadMessage {
        message: Some(Up::Chunk(UploadChunk {
            data: Bytes::copy_from_slice(&content[from..]),
            offset: from as i64,
        })),
    })
    .await
    .unwrap();
    tx.send(UploadMessage {
        message: Some(Up::Complete(peervault_proto::v1::CompleteUpload {
            expected_hash: Bytes::copy_from_slice(blake3::hash(&content).as_bytes()),
        })),
    })
    .await
    .unwrap();
    let key = loop {
        match s.message().await.unwrap().unwrap().response {
            Some(Down::Complete(c)) => break c.key,
            Some(Down::Ack(_)) => {}
            None => panic!("empty response"),
        }
    };
    assert_eq!(get_blob(&ch, &key, None).await.unwrap(), content);
    // A finished upload id cannot be resumed again.
    let (tx, rx) = mpsc::channel(1);
    tx.send(UploadMessage {
        message: Some(Up::Start(StartUpload {
            upload_id: id,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut s = UploadServiceClient::new(ch.clone())
        .upload(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.message().await.unwrap_err().code(), Code::NotFound);
}

// Multi-threaded: the test blocks a thread while polling metrics and the upload must go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_upload_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut node = NodeBuilder::new("all")
        .data_dir(&data_dir)
        .arg("--chunk-size")
        .arg(SMALL_CHUNK.to_string())
        .start();
    let ch = node.channel().await;
    let mut acked: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..20 {
        let content = data(100 + i, (i as usize * 37_000) % (3 * SMALL_CHUNK) + 1);
        let key = format!("acked/{i}");
        upload(&ch, &key, &content).await.unwrap();
        acked.push((key, content));
    }
    // Uploads in flight when the process dies: never finished with is_last.
    let (tx, rx) = mpsc::channel(4);
    let mut c = FileServiceClient::new(ch.clone());
    let inflight = tokio::spawn(async move { c.upload_file(ReceiverStream::new(rx)).await });
    let partial = data(999, 3 * SMALL_CHUNK);
    for (i, piece) in partial.chunks(SMALL_CHUNK).enumerate() {
        tx.send(FileChunk {
            file_key: "partial".into(),
            data: Bytes::copy_from_slice(piece),
            offset: (i * SMALL_CHUNK) as i64,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // Wait until the server has made at least one of those chunks durable (a temp or chunk file).
    node.wait_metric("peervault_blob_uploads_in_progress", &[], |v| v >= 1.0);
    node.signal("KILL");
    node.wait_exit(WAIT);
    drop(tx);
    let _ = inflight.await;

    let node = NodeBuilder::new("all")
        .data_dir(&data_dir)
        .arg("--chunk-size")
        .arg(SMALL_CHUNK.to_string())
        .start();
    let ch = node.channel().await;
    for (key, content) in &acked {
        assert_eq!(
            &download(&ch, key).await.unwrap(),
            content,
            "{key} changed across kill -9"
        );
    }
    assert_eq!(download(&ch, "partial").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(tmp_files(&data_dir), 0, "temporary files survived recovery");
    assert_eq!(listed_total(&ch).await, 20);
}

/// Small puts are acknowledged through the index journal: killed with -9 right after, the
/// process restarts with every one of them (applied again from the journal) and an overwrite
/// keeps its last value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_small_puts_replays_them_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut node = NodeBuilder::new("all").data_dir(&data_dir).start();
    let ch = node.channel().await;
    let puts: Vec<(String, Vec<u8>)> = (0..64).map(|i| (format!("small/{i}"), data(7_000 + i, 4096))).collect();
    let results = futures_util::future::join_all(puts.iter().map(|(k, d)| upload(&ch, k, d))).await;
    for r in results {
        r.unwrap();
    }
    upload(&ch, "small/0", b"last value").await.unwrap();
    let appends = node
        .metric("peervault_blob_journal_appends_total", &["outcome=\"ok\""])
        .unwrap_or(0.0);
    assert!(appends >= 1.0, "the puts did not go through the journal");
    node.signal("KILL");
    node.wait_exit(WAIT);

    let node = NodeBuilder::new("all").data_dir(&data_dir).start();
    let replayed = node
        .metric("peervault_blob_journal_replayed_puts_total", &[])
        .unwrap_or(0.0);
    assert!(replayed >= 1.0, "nothing was replayed from the journal after kill -9");
    let ch = node.channel().await;
    assert_eq!(download(&ch, "small/0").await.unwrap(), b"last value");
    for (key, content) in puts.iter().skip(1) {
        assert_eq!(&download(&ch, key).await.unwrap(), content, "{key} lost across kill -9");
    }
    assert_eq!(listed_total(&ch).await, 64);
}

#[tokio::test]
async fn a_flipped_byte_on_disk_is_reported_as_data_loss() {
    let node = small_chunk_node();
    let ch = node.channel().await;
    let content = data(5, 2 * SMALL_CHUNK);
    upload(&ch, "victim", &content).await.unwrap();
    let second = blake3::hash(&content[SMALL_CHUNK..]).to_hex().to_string();
    flip_stored_byte(&node.data_dir, &content[SMALL_CHUNK..SMALL_CHUNK + 64], 100);
    let st = download(&ch, "victim").await.unwrap_err();
    assert_eq!(st.code(), Code::DataLoss, "{st:?}");
    assert!(st.message().contains(&second), "{}", st.message());
    assert_eq!(node.metric("peervault_blob_integrity_failures_total", &[]), Some(1.0));
    // Other content is unaffected.
    let r = upload(&ch, "other", b"fine").await.unwrap();
    assert_eq!(get_blob(&ch, r.hash.as_bytes(), None).await.unwrap(), b"fine");
}

#[tokio::test]
async fn concurrent_uploads_of_the_same_content_and_the_same_key() {
    let node = small_chunk_node();
    let ch = node.channel().await;
    let same = data(21, 3 * SMALL_CHUNK + 5);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (ch, same) = (ch.clone(), same.clone());
        tasks.push(tokio::spawn(async move {
            upload(&ch, &format!("same/{i}"), &same).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(stored_chunks(&node), 4);
    let contents: Vec<Vec<u8>> = (0..8).map(|i| data(200 + i, SMALL_CHUNK * 2 + i as usize)).collect();
    let mut tasks = Vec::new();
    for c in contents.clone() {
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move { upload(&ch, "contended", &c).await.unwrap() }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let winner = download(&ch, "contended").await.unwrap();
    assert!(contents.contains(&winner), "the key holds a mix of uploads");
    let list = FileServiceClient::new(ch.clone())
        .list_files(ListFilesRequest {
            prefix: "contended".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.total, 1);
}

#[tokio::test]
async fn metadata_updates_move_updated_at() {
    let node = Node::start("all");
    let ch = node.channel().await;
    let mut c = FileServiceClient::new(ch.clone());
    let first = c
        .upload_file(tokio_stream::iter(vec![FileChunk {
            file_key: "doc.pdf".into(),
            data: Bytes::from_static(b"%PDF"),
            is_last: true,
            metadata: HashMap::from([("owner".into(), "ana".into())]),
            ..Default::default()
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.content_type, "application/pdf");
    let updated = c
        .update_file_metadata(UpdateFileMetadataRequest {
            key: "doc.pdf".into(),
            metadata: HashMap::from([("team".into(), "x".into())]),
            name: Some("Report".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.metadata.len(), 2);
    assert_eq!(updated.name, "Report");
    let (a, b) = (first.updated_at.unwrap(), updated.updated_at.unwrap());
    assert!((b.seconds, b.nanos) > (a.seconds, a.nanos));
    assert_eq!(updated.created_at, first.created_at);
    let blobs: Vec<_> = {
        let mut s = BlobServiceClient::new(ch.clone())
            .list_blobs(ListBlobsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut v = Vec::new();
        while let Some(m) = s.message().await.unwrap() {
            v.push(m);
        }
        v
    };
    assert_eq!(blobs.len(), 1);
}

/// Every kind of bad input gets its status, and what was stored stays exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_status_and_changes_nothing() {
    let node = NodeBuilder::new("all")
        .arg("--chunk-size")
        .arg(SMALL_CHUNK.to_string())
        .arg("--quota-bytes")
        .arg((8 * SMALL_CHUNK).to_string())
        .arg("--max-message-size")
        .arg((2 * 1024 * 1024).to_string())
        .start();
    let ch = node.channel().await;
    let keep = data(1, SMALL_CHUNK + 10);
    upload(&ch, "keep", &keep).await.unwrap();
    let snapshot = |n: &Node| {
        (
            n.metric("peervault_blob_files", &[]),
            n.metric("peervault_blob_storage_used_bytes", &[]),
            stored_chunks(n),
        )
    };
    let before = snapshot(&node);
    let expect = |r: Result<peervault_proto::v1::FileResponse, Status>, code: Code, what: &str| {
        let st = r.expect_err(what);
        assert_eq!(st.code(), code, "{what}: {st:?}");
        assert!(!st.message().is_empty());
    };
    let ok = |key: &str, d: &[u8]| chunks_of(key, d, 1000);

    expect(upload(&ch, "", b"x").await, Code::InvalidArgument, "empty key");
    expect(
        upload(&ch, &"k".repeat(1025), b"x").await,
        Code::InvalidArgument,
        "over-long key",
    );
    expect(
        upload(&ch, "bad\u{7}key", b"x").await,
        Code::InvalidArgument,
        "control character",
    );
    let mut m = ok("keep", &data(2, 3000));
    m[1].offset += 1;
    expect(upload_msgs(&ch, m).await, Code::InvalidArgument, "gap");
    let mut m = ok("keep", &data(2, 3000));
    m[2].offset -= 1;
    expect(upload_msgs(&ch, m).await, Code::InvalidArgument, "overlap");
    let mut m = ok("keep", &data(2, 3000));
    m[1].file_key = "other".into();
    expect(
        upload_msgs(&ch, m).await,
        Code::InvalidArgument,
        "different key mid-stream",
    );
    let mut m = ok("keep", &data(2, 3000));
    m[0].is_last = true;
    expect(upload_msgs(&ch, m).await, Code::InvalidArgument, "data after is_last");
    let mut m = ok("keep", &data(2, 3000));
    m.last_mut().unwrap().is_last = false;
    expect(
        upload_msgs(&ch, m).await,
        Code::InvalidArgument,
        "closed before is_last",
    );
    let mut m = ok("keep", &data(2, 3000));
    m[1].checksum = blake3::hash(b"something else").to_hex().to_string();
    expect(upload_msgs(&ch, m).await, Code::InvalidArgument, "checksum mismatch");
    let mut m = ok("keep", &data(2, 3000));
    m[0].expected_hash = blake3::hash(b"nope").to_hex().to_string();
    expect(upload_msgs(&ch, m).await, Code::InvalidArgument, "wrong expected hash");
    let mut m = ok("keep", b"x");
    m[0].metadata = (0..200).map(|i| (format!("k{i}"), "v".into())).collect();
    expect(
        upload_msgs(&ch, m).await,
        Code::InvalidArgument,
        "metadata over the cap",
    );
    expect(
        upload(&ch, "huge", &data(3, 9 * SMALL_CHUNK)).await,
        Code::ResourceExhausted,
        "quota",
    );
    let big = vec![FileChunk {
        file_key: "keep".into(),
        data: Bytes::from(vec![0u8; 3 * 1024 * 1024]),
        is_last: true,
        ..Default::default()
    }];
    let st = upload_msgs(&ch, big).await.unwrap_err();
    assert!(
        matches!(st.code(), Code::OutOfRange | Code::ResourceExhausted),
        "oversized message: {st:?}"
    );

    // Graviton uploads: wrong expected hash, declared size not met or exceeded.
    let content = data(4, 1000);
    let st = graviton_upload(&ch, &content, Some(blake3::hash(b"other").as_bytes().to_vec()))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    for declared in [999i64, 1001] {
        let msgs = vec![
            UploadMessage {
                message: Some(Up::Start(StartUpload {
                    total_size: declared,
                    ..Default::default()
                })),
            },
            UploadMessage {
                message: Some(Up::Chunk(UploadChunk {
                    data: Bytes::from(content.clone()),
                    offset: 0,
                })),
            },
            UploadMessage {
                message: Some(Up::Complete(Default::default())),
            },
        ];
        let mut s = UploadServiceClient::new(ch.clone())
            .upload(tokio_stream::iter(msgs))
            .await
            .unwrap()
            .into_inner();
        let mut code = None;
        loop {
            match s.message().await {
                Ok(Some(UploadResponse {
                    response: Some(Down::Complete(_)),
                })) => panic!("declared {declared} accepted"),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    code = Some(e.code());
                    break;
                }
            }
        }
        assert_eq!(code, Some(Code::InvalidArgument), "declared size {declared}");
    }

    // Unknown keys.
    let mut fc = FileServiceClient::new(ch.clone());
    assert_eq!(
        fc.get_file(FileRequest {
            key: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    assert_eq!(
        fc.delete_file(FileRequest {
            key: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    assert_eq!(download(&ch, "nope").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        fc.update_file_metadata(UpdateFileMetadataRequest {
            key: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    let unknown = blake3::hash(b"never stored");
    assert_eq!(
        get_blob(&ch, unknown.as_bytes(), None).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        get_blob(&ch, b"short", None).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let too_big_meta = UpdateFileMetadataRequest {
        key: "keep".into(),
        metadata: HashMap::from([("k".into(), "v".repeat(5000))]),
        ..Default::default()
    };
    assert_eq!(
        fc.update_file_metadata(too_big_meta).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    assert_eq!(snapshot(&node), before, "bad input changed stored data");
    assert_eq!(download(&ch, "keep").await.unwrap(), keep);
    node.wait_metric("peervault_blob_uploads_in_progress", &[], |v| v == 0.0);
    assert_eq!(tmp_files(&node.data_dir), 0);
}
