//! One test per engine defect of issue 11, each failing on the engine before its fix. Races are
//! driven with the store's test hooks (`Store::set_hook`), never with sleeps.

use std::{
    collections::HashMap,
    fs,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc as std_mpsc,
    },
    time::Duration,
};

use super::*;
use crate::store::records::FileRec;

const CHUNK: u32 = 64 * 1024;
const WAIT: Duration = Duration::from_secs(20);

fn cfg() -> BlobConfig {
    BlobConfig {
        chunk_size: CHUNK,
        gc_grace: Duration::ZERO,
        ..BlobConfig::default()
    }
}

fn open(dir: &Path, cfg: BlobConfig) -> Store {
    Store::open(dir, cfg, BlobMetrics::new(None).unwrap()).unwrap()
}

fn content(seed: u8, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    blake3::Hasher::new().update(&[seed]).finalize_xof().fill(&mut v);
    v
}

fn finished(store: &Store, data: &[u8]) -> Finished {
    let mut ing = store.ingest(None).unwrap();
    ing.write(data).unwrap();
    ing.finish().unwrap().0
}

fn rec(key: &str) -> FileRec {
    FileRec {
        key: key.into(),
        name: key.into(),
        created_ns: now_ns(),
        updated_ns: now_ns(),
        ..Default::default()
    }
}

async fn put(store: &Store, key: &str, data: &[u8]) -> FileRec {
    let fin = finished(store, data);
    store.put_file(rec(key), fin).await.unwrap().0
}

fn read(store: &Store, key: &str) -> Result<Vec<u8>> {
    let b = store.get_blob(&store.get_file(key)?.blob_key.as_slice().try_into().unwrap())?;
    let mut out = Vec::new();
    for (h, &s) in b.chunk_hashes.iter().zip(&b.chunk_sizes) {
        out.extend_from_slice(&store.read_chunk(&h.as_slice().try_into().unwrap(), s)?);
    }
    Ok(out)
}

/// A hook that stops the engine at `point` (once) until the test lets it go.
struct Gate {
    reached: std_mpsc::Receiver<()>,
    go: std_mpsc::Sender<()>,
}

fn gate(store: &Store, point: &'static str) -> Gate {
    let (reached_tx, reached) = std_mpsc::channel();
    let (go, go_rx) = std_mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let fired = AtomicBool::new(false);
    store.set_hook(Some(Arc::new(move |p: &str| {
        if p == point && !fired.swap(true, Ordering::SeqCst) {
            let _ = reached_tx.send(());
            let _ = go_rx.lock().unwrap().recv_timeout(WAIT);
        }
    })));
    Gate { reached, go }
}

impl Gate {
    async fn wait(&self) {
        tokio::task::block_in_place(|| self.reached.recv_timeout(WAIT).expect("hook point reached"));
    }
    fn release(&self) {
        let _ = self.go.send(());
    }
}

/// Defect 2: GC's transaction drops a chunk record, an upload re-creates the chunk and
/// commits, then GC unlinks. The unlink must re-check the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_does_not_unlink_a_chunk_committed_after_its_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), cfg());
    let data = content(1, 3 * CHUNK as usize);
    put(&store, "a", &data).await;
    store.delete_file("a").await.unwrap();
    let g = gate(&store, "gc.before_unlink");
    let s = store.clone();
    let gc = tokio::spawn(async move { s.collect_garbage().await });
    g.wait().await;
    // GC has committed the removal of the records; the same content is uploaded again now.
    put(&store, "b", &data).await;
    g.release();
    gc.await.unwrap().unwrap();
    assert_eq!(read(&store, "b").unwrap(), data, "an acknowledged file lost its chunks");
}

/// Defect 2, orphan-scan side: a chunk file the index did not know when the scan listed it but
/// that is committed before the unlink decision stays.
#[tokio::test]
async fn the_orphan_scan_keeps_a_chunk_committed_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), cfg());
    let data = content(2, 2 * CHUNK as usize);
    put(&store, "a", &data).await;
    for _ in 0..16 {
        store.remove_orphan_chunk_files().unwrap();
    }
    assert_eq!(read(&store, "a").unwrap(), data);
}

/// Defect 3: a chunk that exists under its name but is rotted is repaired by a new upload of
/// the same content (verified, not trusted); a sound one is kept (never replaced).
#[tokio::test]
async fn an_existing_chunk_is_verified_and_a_rotted_one_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), cfg());
    let data = content(3, 2 * CHUNK as usize);
    put(&store, "a", &data).await;
    let first = *blake3::hash(&data[..CHUNK as usize]).as_bytes();
    store.flip_chunk_bit(&first, 10);
    assert!(matches!(read(&store, "a"), Err(BlobError::DataLoss(_))));
    let rotted = store.chunk_place(&first).unwrap();
    put(&store, "b", &data).await;
    assert_eq!(read(&store, "a").unwrap(), data, "the re-upload repaired the chunk");
    let repaired = store.chunk_place(&first).unwrap();
    assert_ne!(
        (&rotted.0, rotted.1),
        (&repaired.0, repaired.1),
        "the record moved to the new copy"
    );

    put(&store, "c", &data).await;
    assert_eq!(
        store.chunk_place(&first).unwrap(),
        repaired,
        "a sound chunk is never replaced"
    );
}

/// Defect 4: finished content dropped without a commit (a cancelled call) releases its pins,
/// its chunk files and its quota reservation.
#[tokio::test]
async fn dropped_finished_content_releases_pins_and_quota() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        dir.path(),
        BlobConfig {
            quota_bytes: 5 * CHUNK as u64,
            ..cfg()
        },
    );
    let fin = finished(&store, &content(4, 4 * CHUNK as usize));
    assert!(!store.pinned_snapshot().is_empty());
    drop(fin);
    assert!(store.pinned_snapshot().is_empty(), "pins leaked");
    let ing = store.ingest(Some(4 * CHUNK as u64));
    assert!(ing.is_ok(), "quota reservation leaked: {:?}", ing.err());
    drop(ing);
    let files: usize = fs::read_dir(dir.path().join("chunks"))
        .unwrap()
        .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(files, 0, "uncommitted chunk files left behind");
}

/// Defect 4, the cancelled call itself: a put whose caller goes away while the commit is
/// queued still commits whole, and nothing stays pinned or reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_cancelled_mid_commit_is_whole_or_absent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        dir.path(),
        BlobConfig {
            quota_bytes: 5 * CHUNK as u64,
            ..cfg()
        },
    );
    let data = content(5, 3 * CHUNK as usize);
    let fin = finished(&store, &data);
    let g = gate(&store, "committer.batch");
    let s = store.clone();
    let call = tokio::spawn(async move { s.put_file(rec("x"), fin).await });
    g.wait().await;
    call.abort();
    let _ = call.await;
    g.release();
    // The committer finishes the batch; a later commit orders after it.
    store.set_hook(None);
    put(&store, "y", b"after").await;
    assert_eq!(read(&store, "x").unwrap(), data);
    assert!(store.pinned_snapshot().is_empty());
    assert!(store.ingest(Some(CHUNK as u64)).is_ok(), "reservation leaked");
}

/// Defect 5: a resumable upload's durable chunks count once against the quota, not as stored
/// bytes and as a reservation.
#[tokio::test]
async fn resumable_upload_bytes_count_once_against_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let quota = 6 * CHUNK as u64;
    let store = open(
        dir.path(),
        BlobConfig {
            quota_bytes: quota,
            ..cfg()
        },
    );
    let total = 4 * CHUNK as u64;
    let data = content(6, total as usize);
    let session = store.create_upload("u", total, HashMap::new()).await.unwrap();
    let mut ing = store.ingest(Some(total)).unwrap();
    ing.write(&data[..3 * CHUNK as usize]).unwrap();
    let done = ing.make_durable().unwrap();
    store.append_upload("u", session, &done).await.unwrap();
    ing.committed(&done);
    assert_eq!(store.stats().storage_used, 3 * CHUNK as u64);
    // 3 chunks stored + 1 still reserved = 4 of 6: two more chunks fit.
    let other = store.ingest(Some(2 * CHUNK as u64));
    assert!(other.is_ok(), "double-counted: {:?}", other.err());
}

/// Defect 1, engine side: appends and completions of a superseded session are refused, a
/// completion whose chunk list does not start with the recorded chunks is refused (no panic),
/// and the write path stays up.
#[tokio::test]
async fn only_the_live_session_appends_or_completes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), cfg());
    let data = content(7, 4 * CHUNK as usize);
    let s1 = store.create_upload("u", 0, HashMap::new()).await.unwrap();
    let (_, rows) = store.claim_upload("u").await.unwrap();
    assert!(rows.is_empty());
    let mut a = store.ingest(None).unwrap();
    a.write(&data[..3 * CHUNK as usize]).unwrap();
    let done = a.make_durable().unwrap();
    assert!(matches!(
        store.append_upload("u", s1, &done).await,
        Err(BlobError::Aborted(_))
    ));
    let (rec2, _) = store.claim_upload("u").await.unwrap();
    // The live session appends three chunks ...
    store.append_upload("u", rec2.session, &done).await.unwrap();
    a.committed(&done);
    // ... a wrong expected offset is refused ...
    assert!(matches!(
        store.append_upload("u", rec2.session, &done).await,
        Err(BlobError::Aborted(_))
    ));
    // ... and a completion with only one chunk is refused, not a panic.
    let short = finished(&store, &data[..CHUNK as usize + 5]);
    assert!(matches!(
        store.complete_upload("u", rec2.session, short).await,
        Err(BlobError::Aborted(_))
    ));
    put(&store, "still", b"writable").await;
    let (f, _) = a.finish().unwrap();
    let b = store.complete_upload("u", rec2.session, f).await.unwrap();
    assert_eq!(b.size, 3 * CHUNK as u64);
}

/// Defect 1: a panic in the committer is fatal (the process exits in production; here the
/// hook records it) and no later write is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committer_panic_is_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), cfg());
    let fatal = Arc::new(AtomicUsize::new(0));
    let f = fatal.clone();
    store.set_hook(Some(Arc::new(move |p: &str| match p {
        "committer.batch" => panic!("injected"),
        "committer.fatal" => {
            f.fetch_add(1, Ordering::SeqCst);
        }
        _ => {}
    })));
    let r = store.delete_file("nothing").await;
    assert!(matches!(r, Err(BlobError::Unavailable(_))), "{r:?}");
    assert_eq!(fatal.load(Ordering::SeqCst), 1);
    let r = store.delete_file("nothing").await;
    assert!(matches!(r, Err(BlobError::Unavailable(_))), "{r:?}");
}

/// Defect 10: tombstones expire after `--tombstone-expiry`.
#[tokio::test]
async fn tombstones_expire() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        dir.path(),
        BlobConfig {
            tombstone_expiry: Duration::ZERO,
            ..cfg()
        },
    );
    put(&store, "t", b"x").await;
    store.delete_file("t").await.unwrap();
    assert!(store.tombstone("t").unwrap().is_some());
    store.collect_garbage().await.unwrap();
    assert!(store.tombstone("t").unwrap().is_none());
    // A live tombstone is kept, and re-creating the file removes it with its time entry.
    let keep = open(tempfile::tempdir().unwrap().path(), cfg());
    put(&keep, "t", b"x").await;
    keep.delete_file("t").await.unwrap();
    keep.collect_garbage().await.unwrap();
    assert!(keep.tombstone("t").unwrap().is_some());
    put(&keep, "t", b"y").await;
    assert!(keep.tombstone("t").unwrap().is_none());
}

/// Defect 10: a second process on the same volume stops before touching the first one's
/// in-flight files.
#[tokio::test]
async fn a_second_store_on_one_volume_leaves_tmp_alone() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path(), cfg());
    let inflight = dir.path().join("tmp").join("in-flight.part");
    fs::write(&inflight, b"being written").unwrap();
    let second = Store::open(dir.path(), cfg(), BlobMetrics::new(None).unwrap());
    assert!(matches!(second, Err(BlobError::Unavailable(_))));
    assert!(
        inflight.exists(),
        "the second process deleted the first one's temporary file"
    );
}

/// Defect 10: EIO on read is DATA_LOSS; ENOSPC and EDQUOT are a full volume.
#[test]
fn os_errors_map_to_their_kinds() {
    let e = |errno: rustix::io::Errno| std::io::Error::from_raw_os_error(errno.raw_os_error());
    assert!(matches!(
        BlobError::io("read", e(rustix::io::Errno::IO)),
        BlobError::DataLoss(_)
    ));
    assert!(matches!(
        BlobError::io("write", e(rustix::io::Errno::NOSPC)),
        BlobError::VolumeFull(_)
    ));
    assert!(matches!(
        BlobError::io("write", e(rustix::io::Errno::DQUOT)),
        BlobError::VolumeFull(_)
    ));
    let s: tonic::Status = BlobError::io("write", e(rustix::io::Errno::NOSPC)).into();
    assert_eq!(s.code(), tonic::Code::ResourceExhausted);
    assert!(s.message().contains("volume full"), "{}", s.message());
}

/// Defect 8: a resumed upload continues the whole-content key from stored chaining values,
/// without reading a stored chunk again (here: they are deleted before the resume).
#[tokio::test]
async fn resume_does_not_reread_stored_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), cfg());
    let data = content(8, 5 * CHUNK as usize + 123);
    let s = store
        .create_upload("u", data.len() as u64, HashMap::new())
        .await
        .unwrap();
    let mut ing = store.ingest(Some(data.len() as u64)).unwrap();
    ing.write(&data[..3 * CHUNK as usize]).unwrap();
    let done = ing.make_durable().unwrap();
    store.append_upload("u", s, &done).await.unwrap();
    ing.committed(&done);
    drop(ing);
    let (rec, rows) = store.claim_upload("u").await.unwrap();
    assert_eq!(rows.len(), 3);
    // Stored chunks made unreadable (any read of them would change the key).
    for r in &rows {
        let h: [u8; 32] = r.hash.as_slice().try_into().unwrap();
        store.flip_chunk_bit(&h, 0);
    }
    let mut ing = store.resume_ingest(rec.total_size, &rows).unwrap();
    ing.write(&data[3 * CHUNK as usize..]).unwrap();
    let (fin, _) = ing.finish().unwrap();
    assert_eq!(fin.blob.key, *blake3::hash(&data).as_bytes());
}
