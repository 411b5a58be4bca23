//! A full volume through a real `peervault` process, on a small tmpfs mounted for the test
//! (needs root, as in CI): uploads past the space answer RESOURCE_EXHAUSTED "volume full",
//! nothing acknowledged is lost, no temporary file stays behind, the refusal is counted, and
//! deletes and GC still commit so that writes resume.

mod common;

use std::{path::Path, process::Command};

use bytes::Bytes;
use common::NodeBuilder;
use peervault_proto::v1::{FileChunk, FileRequest, file_service_client::FileServiceClient};
use tonic::{Code, transport::Channel};

const MIB: usize = 1024 * 1024;

/// Unmounts the test filesystem when dropped.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &Path, size: &str) -> Option<Mount> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    if uid.trim_ascii() != b"0" {
        eprintln!("skipped: mounting a tmpfs needs root");
        return None;
    }
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "mount -t tmpfs failed");
    Some(Mount(dir.to_path_buf()))
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut v);
    v
}

async fn put(ch: &Channel, key: &str, content: Vec<u8>) -> Result<(), tonic::Status> {
    let msgs: Vec<FileChunk> = content
        .chunks(256 * 1024)
        .enumerate()
        .map(|(i, c)| FileChunk {
            file_key: key.into(),
            data: Bytes::copy_from_slice(c),
            offset: (i * 256 * 1024) as i64,
            is_last: (i + 1) * 256 * 1024 >= content.len(),
            ..Default::default()
        })
        .collect();
    FileServiceClient::new(ch.clone())
        .upload_file(tokio_stream::iter(msgs))
        .await
        .map(|_| ())
}

async fn get(ch: &Channel, key: &str) -> Vec<u8> {
    let mut s = FileServiceClient::new(ch.clone())
        .download_file(FileRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        out.extend_from_slice(&m.data);
    }
    out
}

#[tokio::test]
async fn a_full_volume_is_resource_exhausted_and_recovers_after_deletes() {
    let root = tempfile::tempdir().unwrap();
    let Some(_mount) = mount_tmpfs(root.path(), "48m") else {
        return;
    };
    let node = NodeBuilder::new("all")
        .data_dir(root.path())
        .arg("--volume-reserve")
        .arg((4 * MIB).to_string())
        .arg("--gc-grace")
        .arg("0s")
        .arg("--gc-interval")
        .arg("200ms")
        .start();
    let ch = node.channel().await;
    let mut stored = Vec::new();
    let mut refusal = None;
    for i in 0..100u64 {
        match put(&ch, &format!("f/{i}"), data(i, 2 * MIB)).await {
            Ok(()) => stored.push(i),
            Err(s) => {
                refusal = Some(s);
                break;
            }
        }
    }
    let refusal = refusal.expect("a 48 MiB volume fills up within 100 × 2 MiB");
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(refusal.message().contains("volume full"), "{}", refusal.message());
    assert!(stored.len() >= 10, "only {} files fit", stored.len());
    // Nothing acknowledged is lost, no temporary file stays, the refusal is counted.
    for &i in &stored {
        assert_eq!(get(&ch, &format!("f/{i}")).await, data(i, 2 * MIB), "file {i}");
    }
    let tmp = std::fs::read_dir(root.path().join("blob/tmp")).unwrap().count();
    assert_eq!(tmp, 0, "temporary files left behind");
    node.wait_metric("peervault_blob_volume_full_total", &[], |v| v >= 1.0);
    // Deletes commit on the full volume and GC gives the space back.
    for &i in stored.iter().take(6) {
        FileServiceClient::new(ch.clone())
            .delete_file(FileRequest {
                key: format!("f/{i}"),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    node.wait_metric("peervault_blob_gc_chunks_collected_total", &[], |v| v >= 12.0);
    put(&ch, "after", data(999, 2 * MIB))
        .await
        .expect("writes resume after deletes");
    assert_eq!(get(&ch, "after").await, data(999, 2 * MIB));
}
