//! Segment files: chunks read back by location after a restart, deduplicated content appended
//! once, compaction racing an upload that pins a chunk (driven with `Store::set_hook`), power
//! loss during compaction and a torn segment tail on the simulated disk, and per-chunk files of
//! older data dirs still read.

use std::{
    sync::{
        Arc, Mutex as StdMutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use super::{sim_disk::SimDisk, *};
use crate::store::records::FileRec;

const CHUNK: u32 = 64 * 1024;

fn cfg() -> BlobConfig {
    BlobConfig {
        chunk_size: CHUNK,
        gc_grace: Duration::ZERO,
        volume_reserve: 0,
        index_cache: 4 * 1024 * 1024,
        ..BlobConfig::default()
    }
}

fn open(dir: &Path) -> Store {
    Store::open(dir, cfg(), BlobMetrics::new(None).unwrap()).unwrap()
}

fn open_sim(disk: &SimDisk) -> Result<Store> {
    Store::open_on(
        Arc::new(disk.clone()),
        Path::new("/sim/blob"),
        cfg(),
        BlobMetrics::new(None).map_err(|e| BlobError::Unavailable(e.to_string()))?,
    )
}

fn content(seed: u8, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    blake3::Hasher::new().update(&[seed]).finalize_xof().fill(&mut v);
    v
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

async fn put(store: &Store, key: &str, data: &[u8]) -> Result<FileRec> {
    let mut ing = store.ingest(None)?;
    for piece in data.chunks(40_000) {
        ing.write(piece)?;
    }
    let (fin, _) = ing.finish()?;
    Ok(store.put_file(rec(key), fin).await?.0)
}

fn read(store: &Store, key: &str) -> Result<Vec<u8>> {
    let b = store.get_blob(&store.get_file(key)?.blob_key.as_slice().try_into().unwrap())?;
    let mut out = Vec::new();
    for (h, &s) in b.chunk_hashes.iter().zip(&b.chunk_sizes) {
        out.extend_from_slice(&store.read_chunk(&h.as_slice().try_into().unwrap(), s)?);
    }
    Ok(out)
}

fn hash_of(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}

fn segment_of(store: &Store, chunk: &[u8]) -> u64 {
    store
        .chunk_record(&hash_of(chunk))
        .unwrap()
        .and_then(|r| r.loc)
        .map(|l| l.segment)
        .expect("the chunk lives in a segment")
}

fn segment_len(store: &Store, id: u64) -> u64 {
    std::fs::metadata(store.segment_path(id)).unwrap().len()
}

#[tokio::test]
async fn chunks_survive_a_restart_and_read_back_by_location() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(1, 3 * CHUNK as usize + 500);
    {
        let store = open(dir.path());
        put(&store, "a", &data).await.unwrap();
    }
    let store = open(dir.path());
    for (i, c) in data.chunks(CHUNK as usize).enumerate() {
        let (path, off, size) = store.chunk_place(&hash_of(c)).expect("a segment location");
        assert_eq!(size as usize, c.len());
        assert_eq!(off, (i * CHUNK as usize) as u64, "appended one after another");
        assert!(path.starts_with(dir.path().join("segments")));
    }
    assert_eq!(read(&store, "a").unwrap(), data);
    // No per-chunk files for uploads.
    let files: usize = std::fs::read_dir(dir.path().join("chunks"))
        .unwrap()
        .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(files, 0);
}

#[tokio::test]
async fn deduplicated_content_is_appended_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let c = content(2, CHUNK as usize);
    // One object that repeats a chunk, then the same object again under another key.
    let data = [c.as_slice(), &c, &c, b"tail"].concat();
    put(&store, "a", &data).await.unwrap();
    let seg = segment_of(&store, &c);
    put(&store, "b", &data).await.unwrap();
    put(&store, "c", &c).await.unwrap();
    assert_eq!(read(&store, "a").unwrap(), data);
    assert_eq!(read(&store, "b").unwrap(), data);
    assert_eq!(read(&store, "c").unwrap(), c);
    assert_eq!(store.stats().storage_used, CHUNK as u64 + 4);
    // The repeated chunk's bytes were given back (written over by the next chunk), and later
    // uploads of the same content add nothing to the segment: new content follows the tail.
    let tail = store.chunk_place(&hash_of(b"tail")).unwrap();
    assert_eq!(tail.1, CHUNK as u64, "the tail follows the one stored copy");
    let d = content(13, CHUNK as usize);
    put(&store, "d", &d).await.unwrap();
    let next = store.chunk_place(&hash_of(&d)).unwrap();
    assert_eq!((&next.0, next.1), (&tail.0, CHUNK as u64 + 4));
    assert_eq!(segment_of(&store, &c), seg);
    assert_eq!(segment_len(&store, seg), 2 * CHUNK as u64 + 4);
}

/// Uploads `"a"` (2 chunks) and `"b"` (4 chunks) into one segment, seals it and makes `b`'s
/// chunks dead, so the segment is two thirds dead.
async fn mostly_dead_segment(store: &Store) -> (Vec<u8>, u64) {
    let a = content(3, 2 * CHUNK as usize);
    put(store, "a", &a).await.unwrap();
    put(store, "b", &content(4, 4 * CHUNK as usize)).await.unwrap();
    let seg = segment_of(store, &a[..CHUNK as usize]);
    store.delete_file("b").await.unwrap();
    (a, seg)
}

/// An upload pins a chunk in the segment (it deduplicated against it) before compaction runs:
/// compaction moves the live chunks, keeps the segment while the pin holds, and frees it on
/// the next pass once the upload committed.
#[tokio::test]
async fn compaction_keeps_a_pinned_segment_until_the_upload_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (a, seg) = mostly_dead_segment(&store).await;
    let c = [&a[..CHUNK as usize], &content(5, 100)].concat();
    store.seal_segments();
    let mut ing = store.ingest(None).unwrap();
    ing.write(&c[..CHUNK as usize]).unwrap(); // sealed: a deduplicated chunk, pinned in `seg`
    store.collect_garbage().await.unwrap();
    assert!(store.has_segment(seg), "a segment an upload pins is kept");
    assert_ne!(segment_of(&store, &a[..CHUNK as usize]), seg, "live chunks moved");
    assert_eq!(read(&store, "a").unwrap(), a);
    ing.write(&c[CHUNK as usize..]).unwrap();
    let (fin, _) = ing.finish().unwrap();
    store.put_file(rec("c"), fin).await.unwrap();
    let (freed, _) = store.compact_segments().await.unwrap();
    assert_eq!(freed, 1);
    assert!(!store.has_segment(seg));
    assert!(!store.segment_path(seg).exists());
    assert_eq!(read(&store, "a").unwrap(), a);
    assert_eq!(read(&store, "c").unwrap(), c);
    assert!(store.metrics().compaction_bytes.get() >= 2 * CHUNK as u64);
    assert_eq!(store.metrics().segments_freed.get(), 1);
}

/// The race the pin lock decides: an upload deduplicates against a chunk after compaction
/// committed its move and before it deletes the old segment. The upload must find the moved
/// copy (the segment goes at once) and its file must read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_deduplicating_mid_compaction_follows_the_moved_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (a, seg) = mostly_dead_segment(&store).await;
    let c = [&a[..CHUNK as usize], &content(6, 100)].concat();
    let ing = Arc::new(StdMutex::new(Some(store.ingest(None).unwrap())));
    let fired = Arc::new(AtomicBool::new(false));
    {
        let (ing, fired, c) = (ing.clone(), fired.clone(), c.clone());
        store.set_hook(Some(Arc::new(move |p: &str| {
            if p == "compact.before_delete" && !fired.swap(true, Ordering::SeqCst) {
                let mut g = ing.lock().unwrap();
                g.as_mut().unwrap().write(&c[..CHUNK as usize]).unwrap();
            }
        })));
    }
    store.seal_segments();
    store.collect_garbage().await.unwrap();
    store.set_hook(None);
    assert!(
        fired.load(Ordering::SeqCst),
        "the hook ran between the move and the delete"
    );
    assert!(!store.has_segment(seg), "nothing pinned the old segment: it went");
    let mut ing = ing.lock().unwrap().take().unwrap();
    ing.write(&c[CHUNK as usize..]).unwrap();
    let (fin, _) = ing.finish().unwrap();
    store.put_file(rec("c"), fin).await.unwrap();
    assert_eq!(read(&store, "a").unwrap(), a);
    assert_eq!(read(&store, "c").unwrap(), c);
    // And after a restart.
    drop(store);
    let store = open(dir.path());
    assert_eq!(read(&store, "c").unwrap(), c);
}

/// Power fails at every disk operation of a compaction pass in turn: after the restart every
/// acknowledged file reads back, and compaction then finishes.
#[tokio::test]
async fn power_loss_during_compaction_loses_nothing() {
    let a = content(7, 2 * CHUNK as usize + 9);
    let prepare = |disk: &SimDisk| {
        let disk = disk.clone();
        let a = a.clone();
        async move {
            let store = open_sim(&disk).unwrap();
            put(&store, "a", &a).await.unwrap();
            put(&store, "b", &content(8, 5 * CHUNK as usize)).await.unwrap();
            store.delete_file("b").await.unwrap();
            // GC without the compaction that ends a full pass.
            store.gc_batch().await.unwrap();
            store.seal_segments();
            store
        }
    };
    // How many operations an uninterrupted pass takes.
    let disk = SimDisk::new(1);
    let store = prepare(&disk).await;
    let before = disk.ops();
    let (freed, copied) = store.compact_segments().await.unwrap();
    assert_eq!((freed, copied), (1, a.len() as u64));
    let total = disk.ops() - before;
    drop(store);
    let mut crashed = 0;
    for n in 0..=total {
        let disk = SimDisk::new(n + 2);
        let store = prepare(&disk).await;
        disk.fail_after(n);
        let r = store.compact_segments().await;
        crashed += disk.failed() as u64;
        drop(store);
        disk.power_loss();
        let store = open_sim(&disk).unwrap_or_else(|e| panic!("op {n}: reopen: {e}"));
        assert_eq!(read(&store, "a").unwrap_or_else(|e| panic!("op {n} ({r:?}): {e}")), a);
        store.seal_segments();
        store.compact_segments().await.unwrap();
        store.collect_garbage().await.unwrap();
        assert_eq!(read(&store, "a").unwrap_or_else(|e| panic!("op {n}, after: {e}")), a);
    }
    assert!(
        crashed >= total,
        "only {crashed} of {total} runs crashed mid-compaction"
    );
}

/// Power fails while an upload is appending (nothing of it synced or committed): a random
/// part of its bytes survives as the segment's tail. The restart ignores it, acknowledged files
/// read back, and new writes and compaction work.
#[tokio::test]
async fn a_torn_segment_tail_after_power_loss_is_ignored() {
    for seed in 1..=12u64 {
        let disk = SimDisk::new(seed);
        let a = content(9, 2 * CHUNK as usize + 3);
        {
            let store = open_sim(&disk).unwrap();
            put(&store, "a", &a).await.unwrap();
            let mut ing = store.ingest(None).unwrap();
            ing.write(&content(10, 3 * CHUNK as usize + 1000)).unwrap();
            disk.fail_after(0);
            drop(ing);
        }
        disk.power_loss();
        let store = open_sim(&disk).unwrap();
        assert_eq!(read(&store, "a").unwrap(), a, "seed {seed}");
        let b = content(11, 2 * CHUNK as usize);
        put(&store, "b", &b).await.unwrap();
        store.delete_file("a").await.unwrap();
        store.seal_segments();
        store.collect_garbage().await.unwrap();
        drop(store);
        let store = open_sim(&disk).unwrap();
        assert_eq!(read(&store, "b").unwrap(), b, "seed {seed}");
        assert!(matches!(store.get_file("a"), Err(BlobError::NotFound(_))));
    }
}

/// Chunks stored one file per chunk (data dirs written before segments, and repair copies)
/// still read, deduplicate new uploads, and are collected.
#[tokio::test]
async fn per_chunk_files_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let data = content(12, 2 * CHUNK as usize);
    let chunks: Vec<&[u8]> = data.chunks(CHUNK as usize).collect();
    for c in &chunks {
        assert!(store.put_chunk(&hash_of(c), c).unwrap());
        assert!(store.chunk_path(&hash_of(c)).exists());
    }
    let r = record_of("old", &data);
    assert!(store.apply_record(r, None).await.unwrap().0);
    assert!(store.chunk_place(&hash_of(chunks[0])).is_none(), "a per-chunk file");
    assert_eq!(read(&store, "old").unwrap(), data);
    // A new upload of the same content uses the verified files; nothing goes to a segment.
    put(&store, "new", &data).await.unwrap();
    assert!(store.chunk_place(&hash_of(chunks[0])).is_none());
    assert_eq!(read(&store, "new").unwrap(), data);
    drop(store);
    let store = open(dir.path());
    assert_eq!(read(&store, "old").unwrap(), data);
    store.delete_file("old").await.unwrap();
    store.delete_file("new").await.unwrap();
    store.collect_garbage().await.unwrap();
    assert!(!store.chunk_path(&hash_of(chunks[0])).exists(), "collected");
}

fn record_of(key: &str, data: &[u8]) -> peervault_proto::v1::FileRecord {
    use peervault_proto::v1::{FileRecord, HybridTimestamp};
    let chunks: Vec<&[u8]> = data.chunks(CHUNK as usize).collect();
    FileRecord {
        key: key.into(),
        blob_key: bytes::Bytes::copy_from_slice(blake3::hash(data).as_bytes()),
        size: data.len() as i64,
        hlc: Some(HybridTimestamp {
            physical_ms: 1,
            logical: 0,
            node_id: "n".into(),
        }),
        chunk_hashes: chunks
            .iter()
            .map(|c| bytes::Bytes::copy_from_slice(&hash_of(c)))
            .collect(),
        chunk_sizes: chunks.iter().map(|c| c.len() as u32).collect(),
        ..Default::default()
    }
}

/// Chunks from other pods go into a segment (no file each), are found by HasChunks and reads
/// once committed, serve a record applied later, and the ones no record uses are collected.
#[tokio::test]
async fn chunks_from_other_pods_go_into_segments_and_wait_for_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let used = content(21, 2 * CHUNK as usize);
    let unused = content(22, CHUNK as usize);
    let mut w = store.replica_chunks();
    // A chunk that does not match its hash is refused and stores nothing.
    let bad = w.put(&hash_of(b"something else"), &unused).unwrap_err();
    assert!(matches!(bad, BlobError::DataLoss(_)), "{bad:?}");
    for c in used.chunks(CHUNK as usize).chain([unused.as_slice()]) {
        assert!(w.put(&hash_of(c), c).unwrap());
    }
    assert!(!w.put(&hash_of(&unused), &unused).unwrap(), "once per batch");
    assert!(!store.has_chunk(&hash_of(&unused)).unwrap(), "not before the commit");
    w.sync().unwrap();
    assert_eq!(w.commit().await.unwrap(), 3);
    for c in used.chunks(CHUNK as usize).chain([unused.as_slice()]) {
        assert!(store.has_chunk(&hash_of(c)).unwrap());
        assert!(!store.chunk_path(&hash_of(c)).exists(), "no file of its own");
        assert!(store.chunk_place(&hash_of(c)).is_some(), "in a segment");
        assert_eq!(store.read_chunk_any(&hash_of(c)).unwrap(), c);
    }
    // A second batch holding a chunk the index has stores nothing new.
    let mut w = store.replica_chunks();
    assert!(!w.put(&hash_of(&unused), &unused).unwrap());
    w.sync().unwrap();
    assert_eq!(w.commit().await.unwrap(), 0);
    assert!(store.apply_record(record_of("r", &used), None).await.unwrap().0);
    // Survives a restart; GC (no grace here) takes the chunk no record uses, keeps the others.
    drop(store);
    let store = open(dir.path());
    store.collect_garbage().await.unwrap();
    assert_eq!(read(&store, "r").unwrap(), used);
    assert!(!store.has_chunk(&hash_of(&unused)).unwrap(), "unused chunk collected");
}

/// Power fails at every step of a batch of received chunks: before the commit nothing is
/// recorded (and the restart is clean); after it, every chunk reads back.
#[tokio::test]
async fn power_loss_while_receiving_chunks_records_all_or_nothing() {
    let data = content(23, 3 * CHUNK as usize);
    // How many disk operations an uninterrupted batch takes.
    let disk = SimDisk::new(1);
    let store = open_sim(&disk).unwrap();
    let before = disk.ops();
    let mut w = store.replica_chunks();
    for c in data.chunks(CHUNK as usize) {
        w.put(&hash_of(c), c).unwrap();
    }
    w.sync().unwrap();
    w.commit().await.unwrap();
    let total = disk.ops() - before;
    drop(store);
    let mut lost = 0;
    for n in 0..=total {
        let disk = SimDisk::new(n + 2);
        let store = open_sim(&disk).unwrap();
        disk.fail_after(n);
        let done = async {
            let mut w = store.replica_chunks();
            for c in data.chunks(CHUNK as usize) {
                w.put(&hash_of(c), c)?;
            }
            w.sync()?;
            w.commit().await
        }
        .await;
        drop(store);
        disk.power_loss();
        let store = open_sim(&disk).unwrap_or_else(|e| panic!("op {n}: reopen: {e}"));
        let held: Vec<bool> = data
            .chunks(CHUNK as usize)
            .map(|c| store.has_chunk(&hash_of(c)).unwrap())
            .collect();
        if done.is_ok() {
            assert_eq!(held, [true; 3], "op {n}: committed, so every chunk is there");
        }
        assert!(held.iter().all(|h| *h == held[0]), "op {n}: all or nothing: {held:?}");
        lost += usize::from(!held[0]);
        for (c, h) in data.chunks(CHUNK as usize).zip(&held) {
            if *h {
                assert_eq!(store.read_chunk_any(&hash_of(c)).unwrap(), c, "op {n}");
            }
        }
    }
    assert!(lost > 0, "no run crashed before the commit: the test walked no failure");
}
