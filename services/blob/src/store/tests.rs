//! Engine tests: round trips at chunk boundaries, deduplication, deletes and garbage collection,
//! restart, integrity failures, and a property test against a model.

use std::{collections::HashMap, fs, time::Duration};

use proptest::prelude::*;

use super::*;
use crate::store::records::FileRec;

const CHUNK: u32 = 64 * 1024;

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

/// Pseudo-random bytes with no repeating chunk inside (so dedup counts are exact).
fn content(seed: u8, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    blake3::Hasher::new().update(&[seed]).finalize_xof().fill(&mut v);
    v
}

async fn put(store: &Store, key: &str, data: &[u8]) -> FileRec {
    let mut ing = store.ingest(None).unwrap();
    // Uneven writes exercise chunk boundaries inside a write.
    for piece in data.chunks(40_000) {
        ing.write(piece).unwrap();
    }
    let (fin, _) = ing.finish().unwrap();
    let rec = FileRec {
        key: key.into(),
        name: key.into(),
        created_ns: now_ns(),
        updated_ns: now_ns(),
        ..Default::default()
    };
    store.put_file(rec, fin).await.unwrap().0
}

fn read(store: &Store, key: &str) -> Vec<u8> {
    let (_, b) = store.get_small_file(key).map(|(f, b, _)| (f, b)).unwrap();
    let mut out = Vec::new();
    for (h, &s) in b.chunk_hashes.iter().zip(&b.chunk_sizes) {
        out.extend_from_slice(&store.read_chunk(&h.as_slice().try_into().unwrap(), s).unwrap());
    }
    out
}

fn tmp_is_empty(dir: &Path) -> bool {
    fs::read_dir(dir.join("tmp")).unwrap().next().is_none()
}

#[tokio::test]
async fn round_trips_at_chunk_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), cfg());
    let c = CHUNK as usize;
    for (i, len) in [0, 1, INLINE_MAX, INLINE_MAX + 1, c, c + 1, 3 * c - 1, 3 * c]
        .into_iter()
        .enumerate()
    {
        let data = content(i as u8, len);
        let key = format!("f{len}");
        let rec = put(&store, &key, &data).await;
        assert_eq!(rec.size, len as u64);
        assert_eq!(rec.blob_key, blake3::hash(&data).as_bytes().to_vec());
        assert_eq!(read(&store, &key), data, "len {len}");
    }
    assert!(tmp_is_empty(dir.path()));
}

#[tokio::test]
async fn equal_content_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), cfg());
    let data = content(9, CHUNK as usize * 2 + 10);
    put(&store, "a", &data).await;
    put(&store, "b", &data).await;
    let s = store.stats();
    assert_eq!(s.files, 2);
    assert_eq!(s.blobs, 1);
    assert_eq!(s.chunks, 3);
    assert_eq!(s.storage_used, data.len() as u64);
    // One delete keeps the content for the other file.
    store.delete_file("a").await.unwrap();
    store.collect_garbage().await.unwrap();
    assert_eq!(read(&store, "b"), data);
    assert!(store.tombstone("a").unwrap().is_some());
    // The last delete lets GC take the chunks and their files.
    store.delete_file("b").await.unwrap();
    let (n, bytes) = store.collect_garbage().await.unwrap();
    assert_eq!((n, bytes), (3, data.len() as u64));
    assert_eq!(store.stats().storage_used, 0);
    assert!(
        store
            .chunk_record(blake3::hash(&data[..CHUNK as usize]).as_bytes())
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_grace_period_keeps_unreferenced_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        dir.path(),
        BlobConfig {
            gc_grace: Duration::from_secs(3600),
            ..cfg()
        },
    );
    put(&store, "a", &content(1, 200_000)).await;
    store.delete_file("a").await.unwrap();
    assert_eq!(store.collect_garbage().await.unwrap(), (0, 0));
    assert!(store.stats().chunks > 0);
}

#[tokio::test]
async fn replacing_a_file_releases_old_content() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), cfg());
    let first = put(&store, "k", &content(1, 100_000)).await;
    let second = put(&store, "k", &content(2, 100)).await;
    assert_eq!(second.created_ns, first.created_ns);
    store.collect_garbage().await.unwrap();
    let s = store.stats();
    assert_eq!((s.files, s.blobs, s.storage_used), (1, 1, 100));
    assert_eq!(read(&store, "k"), content(2, 100));
}

#[tokio::test]
async fn state_survives_a_restart_and_leftovers_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(3, 150_000);
    let orphan = blake3::hash(&content(4, CHUNK as usize));
    {
        let store = open(dir.path(), cfg());
        put(&store, "kept", &data).await;
        // What a crash mid-upload leaves: a temporary file, and a chunk renamed into place that
        // no committed record references.
        fs::write(dir.path().join("tmp").join("1-1.part"), b"partial").unwrap();
        fs::write(store.chunk_path(orphan.as_bytes()), content(4, CHUNK as usize)).unwrap();
    }
    assert!(!tmp_is_empty(dir.path()));
    let store = open(dir.path(), cfg());
    assert!(tmp_is_empty(dir.path()));
    assert_eq!(read(&store, "kept"), data);
    assert_eq!(store.stats().files, 1);
    assert!(store.chunk_path(orphan.as_bytes()).exists());
    // The scan is incremental: a full sweep of the 256 chunk folders takes 16 calls.
    let removed: usize = (0..16).map(|_| store.remove_orphan_chunk_files().unwrap()).sum();
    assert_eq!(removed, 1);
    assert!(!store.chunk_path(orphan.as_bytes()).exists());
    assert_eq!(read(&store, "kept"), data);
}

#[tokio::test]
async fn a_flipped_byte_is_data_loss() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), cfg());
    let data = content(5, 100_000);
    put(&store, "f", &data).await;
    let (_, b) = store.get_small_file("f").map(|(f, b, _)| (f, b)).unwrap();
    let h: [u8; 32] = b.chunk_hashes[0].as_slice().try_into().unwrap();
    store.flip_chunk_bit(&h, 10);
    assert!(matches!(
        store.read_chunk(&h, b.chunk_sizes[0]),
        Err(BlobError::DataLoss(_))
    ));
    assert_eq!(store.metrics().integrity_failures.get(), 1);
    // Bytes gone from the segment (a truncated file) are DATA_LOSS too.
    let (path, off, _) = store.chunk_place(&h).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(off + 5)
        .unwrap();
    assert!(matches!(
        store.read_chunk(&h, b.chunk_sizes[0]),
        Err(BlobError::DataLoss(_))
    ));
}

#[tokio::test]
async fn quota_and_size_limits_refuse_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        dir.path(),
        BlobConfig {
            quota_bytes: 100_000,
            max_object_size: 150_000,
            ..cfg()
        },
    );
    assert!(matches!(
        store.ingest(Some(200_000)),
        Err(BlobError::InvalidArgument(_))
    ));
    assert!(matches!(store.ingest(Some(120_000)), Err(BlobError::QuotaExceeded(_))));
    let mut ing = store.ingest(None).unwrap();
    ing.write(&content(1, 90_000)).unwrap();
    assert!(matches!(
        ing.write(&content(1, 20_000)),
        Err(BlobError::QuotaExceeded(_))
    ));
    drop(ing);
    put(&store, "fits", &content(1, 90_000)).await;
    assert!(tmp_is_empty(dir.path()));
}

#[tokio::test]
async fn resumable_uploads_keep_durable_chunks_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), cfg());
    let data = content(7, CHUNK as usize * 2 + 500);
    let s1 = store
        .create_upload("u1", data.len() as u64, HashMap::new())
        .await
        .unwrap();
    let mut ing = store.ingest(Some(data.len() as u64)).unwrap();
    ing.write(&data[..CHUNK as usize + 10]).unwrap();
    let done = ing.make_durable().unwrap();
    assert_eq!(store.append_upload("u1", s1, &done).await.unwrap(), CHUNK as u64);
    ing.committed(&done);
    drop(ing); // the client went away
    let (rec, rows) = store.claim_upload("u1").await.unwrap();
    let mut ing = store.resume_ingest(rec.total_size, &rows).unwrap();
    assert_eq!(ing.len(), CHUNK as u64);
    ing.write(&data[CHUNK as usize..]).unwrap();
    let done = ing.make_durable().unwrap();
    store.append_upload("u1", rec.session, &done).await.unwrap();
    ing.committed(&done);
    let (fin, _) = ing.finish().unwrap();
    assert_eq!(fin.blob.key, *blake3::hash(&data).as_bytes());
    let b = store.complete_upload("u1", rec.session, fin).await.unwrap();
    assert!(b.pinned);
    assert!(store.get_upload("u1").is_err());
    store.collect_garbage().await.unwrap();
    assert_eq!(store.stats().storage_used, data.len() as u64);

    // An abandoned upload expires and its chunks are collected.
    let dir2 = tempfile::tempdir().unwrap();
    let expiring = open(
        dir2.path(),
        BlobConfig {
            upload_expiry: Duration::ZERO,
            ..cfg()
        },
    );
    let s2 = expiring.create_upload("u2", 0, HashMap::new()).await.unwrap();
    let mut ing = expiring.ingest(None).unwrap();
    ing.write(&content(8, CHUNK as usize)).unwrap();
    let done = ing.make_durable().unwrap();
    expiring.append_upload("u2", s2, &done).await.unwrap();
    ing.committed(&done);
    drop(ing);
    expiring.collect_garbage().await.unwrap();
    assert!(expiring.get_upload("u2").is_err());
    expiring.collect_garbage().await.unwrap();
    assert_eq!(expiring.stats().storage_used, 0);
}

#[derive(Debug, Clone)]
enum ModelOp {
    Put(u8, u8),
    Delete(u8),
    SetMeta(u8, u8),
    Gc,
    Reopen,
}

fn op() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        4 => (0..5u8, 0..6u8).prop_map(|(k, c)| ModelOp::Put(k, c)),
        2 => (0..5u8).prop_map(ModelOp::Delete),
        1 => (0..5u8, 0..3u8).prop_map(|(k, v)| ModelOp::SetMeta(k, v)),
        1 => Just(ModelOp::Gc),
        1 => Just(ModelOp::Reopen),
    ]
}

/// Contents of several shapes: empty, inline, one chunk, several chunks sharing a prefix.
fn model_content(c: u8) -> Vec<u8> {
    let c32 = CHUNK as usize;
    match c {
        0 => vec![],
        1 => content(1, 10),
        2 => content(2, c32),
        3 => content(3, 2 * c32 + 7),
        4 => {
            let mut v = content(3, 2 * c32 + 7);
            v.extend_from_slice(&content(4, 100));
            v
        }
        _ => content(5, INLINE_MAX + 1),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_a_model(ops in proptest::collection::vec(op(), 1..25)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut store = open(dir.path(), cfg());
            let mut model: HashMap<String, (u8, HashMap<String, String>)> = HashMap::new();
            for op in ops {
                match op {
                    ModelOp::Put(k, c) => {
                        put(&store, &format!("k{k}"), &model_content(c)).await;
                        model.insert(format!("k{k}"), (c, HashMap::new()));
                    }
                    ModelOp::Delete(k) => {
                        let r = store.delete_file(&format!("k{k}")).await;
                        assert_eq!(r.is_ok(), model.remove(&format!("k{k}")).is_some());
                    }
                    ModelOp::SetMeta(k, v) => {
                        let key = format!("k{k}");
                        let patch = MetadataPatch {
                            set: HashMap::from([("v".to_string(), v.to_string())]),
                            ..Default::default()
                        };
                        let r = store.update_file(&key, patch).await;
                        match model.get_mut(&key) {
                            Some((_, m)) => {
                                r.unwrap();
                                m.insert("v".into(), v.to_string());
                            }
                            None => assert!(matches!(r, Err(BlobError::NotFound(_)))),
                        }
                    }
                    ModelOp::Gc => {
                        store.collect_garbage().await.unwrap();
                    }
                    ModelOp::Reopen => {
                        drop(store);
                        store = open(dir.path(), cfg());
                    }
                }
                // Every file reads back as the model says, and nothing else exists.
                for (k, (c, meta)) in &model {
                    assert_eq!(&read(&store, k), &model_content(*c));
                    assert_eq!(&store.get_file(k).unwrap().metadata, meta);
                }
                let (listed, more) = store.list_files("", None, 100).unwrap();
                assert!(!more);
                let mut keys: Vec<_> = model.keys().cloned().collect();
                keys.sort();
                assert_eq!(listed.iter().map(|f| f.key.clone()).collect::<Vec<_>>(), keys);
                assert_eq!(store.stats().files, model.len() as u64);
            }
            // After a full collection, storage holds exactly the unique chunks of live content.
            store.collect_garbage().await.unwrap();
            let mut unique = HashMap::new();
            for (c, _) in model.values() {
                let data = model_content(*c);
                if data.len() <= INLINE_MAX {
                    if !data.is_empty() {
                        unique.insert(*blake3::hash(&data).as_bytes(), data.len());
                    }
                } else {
                    for ch in data.chunks(CHUNK as usize) {
                        unique.insert(*blake3::hash(ch).as_bytes(), ch.len());
                    }
                }
            }
            assert_eq!(store.stats().storage_used, unique.values().sum::<usize>() as u64);
            assert_eq!(store.stats().chunks, unique.len() as u64);
            assert!(tmp_is_empty(dir.path()));
        });
    }
}

/// The counters a batch gathers in memory (`index::Batch`) come out as if every operation had
/// committed on its own: puts, a replacement, deduplicated content, a refused delete, a delete.
#[test]
fn counters_of_one_batch_equal_those_of_one_transaction_per_operation() {
    use index::{Batch, ChunkMeta, NewBlob, Op, apply, init_tables, read_counters};
    let put = |key: &str, data: &[u8]| {
        let hash = *blake3::hash(data).as_bytes();
        let mut c = ChunkMeta::new(hash, data.len() as u32);
        c.inline = Some(bytes::Bytes::copy_from_slice(data));
        Op::PutFile {
            rec: FileRec {
                key: key.into(),
                blob_key: hash.to_vec(),
                size: data.len() as u64,
                ..Default::default()
            },
            blob: NewBlob {
                key: hash,
                size: data.len() as u64,
                chunks: vec![c],
                content_type: String::new(),
                attributes: Default::default(),
            },
        }
    };
    let ops = || {
        vec![
            put("a", b"first"),
            put("b", b"shared"),
            put("a", b"replaced content"),
            put("c", b"shared"),
            Op::DeleteFile {
                key: "missing".into(),
                now_ns: 1,
            },
            Op::DeleteFile {
                key: "b".into(),
                now_ns: 2,
            },
        ]
    };
    let dir = tempfile::tempdir().unwrap();
    let one = redb::Database::create(dir.path().join("one.redb")).unwrap();
    let each = redb::Database::create(dir.path().join("each.redb")).unwrap();
    init_tables(&one).unwrap();
    init_tables(&each).unwrap();

    let txn = one.begin_write().unwrap();
    let batch = Batch::new(&txn);
    let refused: Vec<bool> = ops().into_iter().map(|op| apply(&batch, op).is_err()).collect();
    batch.finish().unwrap();
    txn.commit().unwrap();
    assert_eq!(refused, [false, false, false, false, true, false]);

    for op in ops() {
        let txn = each.begin_write().unwrap();
        let batch = Batch::new(&txn);
        let _ = apply(&batch, op);
        batch.finish().unwrap();
        txn.commit().unwrap();
    }
    let (a, b) = (read_counters(&one).unwrap(), read_counters(&each).unwrap());
    let tuple = |c: index::Counters| (c.files, c.blobs, c.chunks, c.storage_used, c.logical_bytes, c.file_gen);
    assert_eq!(tuple(a), tuple(b));
    // "a" (16 bytes) and "c" (6) remain; "first" waits for GC, so three chunks are stored.
    assert_eq!((a.files, a.logical_bytes), (2, 22));
    assert_eq!((a.chunks, a.storage_used), (3, 5 + 6 + 16));
}
