//! Power-loss test: the engine runs a random workload on the simulated disk (`sim_disk.rs`),
//! the power goes after a random number of disk operations (every later call fails), whatever
//! was not fsynced is dropped, and the store is opened again: every acknowledged write must be
//! there and readable, every acknowledged delete gone, and GC afterwards must not lose anything.
//! Resumable uploads are part of the workload (start, appends from new sessions); after the
//! restart each resumes from at least its last acknowledged offset and completes.
//! Large contents go to segment files, and GC passes compact sealed segments, so power loss
//! also strikes segment appends, their syncs and compaction.
//! `PV_POWER_SEEDS` (default 32) sets how many seeds run; CI runs the default.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
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

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Contents the workload draws from (repeats exercise deduplication).
fn contents() -> Vec<Vec<u8>> {
    let make = |seed: u8, len: usize| {
        let mut v = vec![0; len];
        blake3::Hasher::new().update(&[seed]).finalize_xof().fill(&mut v);
        v
    };
    vec![
        Vec::new(),
        make(1, 10),
        make(2, CHUNK as usize),
        make(3, CHUNK as usize + 1),
        make(4, 3 * CHUNK as usize + 77),
        make(5, 5 * CHUNK as usize),
    ]
}

fn open(disk: &SimDisk, fatal: &Arc<AtomicUsize>) -> Result<Store> {
    let store = Store::open_on(
        Arc::new(disk.clone()),
        Path::new("/sim/blob"),
        cfg(),
        BlobMetrics::new(None).map_err(|e| BlobError::Unavailable(e.to_string()))?,
    )?;
    // A committer panic would exit the process; here it is counted and must never happen.
    let f = fatal.clone();
    store.set_hook(Some(Arc::new(move |p: &str| {
        if p == "committer.fatal" {
            f.fetch_add(1, Ordering::SeqCst);
        }
    })));
    Ok(store)
}

async fn put(store: &Store, key: &str, data: &[u8]) -> Result<()> {
    let mut ing = store.ingest(None)?;
    for piece in data.chunks(40_000) {
        ing.write(piece)?;
    }
    let (fin, _) = ing.finish()?;
    let now = now_ns();
    let rec = FileRec {
        key: key.into(),
        name: key.into(),
        created_ns: now,
        updated_ns: now,
        ..Default::default()
    };
    store.put_file(rec, fin).await.map(|_| ())
}

fn read(store: &Store, key: &str) -> Result<Option<Vec<u8>>> {
    let f = match store.get_file(key) {
        Ok(f) => f,
        Err(BlobError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let key: [u8; 32] = f
        .blob_key
        .as_slice()
        .try_into()
        .map_err(|_| BlobError::Corrupt("blob key".into()))?;
    let b = store.get_blob(&key)?;
    let mut out = Vec::new();
    for (h, &s) in b.chunk_hashes.iter().zip(&b.chunk_sizes) {
        let h: [u8; 32] = h.as_slice().try_into().map_err(|_| BlobError::Corrupt("hash".into()))?;
        out.extend_from_slice(&store.read_chunk(&h, s)?);
    }
    Ok(Some(out))
}

/// Resumable uploads of the workload: content, whether the start was acknowledged, and the
/// durable offset of the last acknowledged append.
type Uploads = HashMap<String, (Vec<u8>, bool, u64)>;

/// One append to a resumable upload, as a client that reconnects for it does: claim the
/// upload (a new session), resume from its durable chunks, send up to `chunks` more whole
/// chunks, and record them. Returns the durable offset acknowledged.
async fn append(store: &Store, id: &str, content: &[u8], chunks: u64) -> Result<u64> {
    let (rec, rows) = store.claim_upload(id).await?;
    let from = rec.received as usize;
    let to = (from + (chunks * CHUNK as u64) as usize).min(content.len() / CHUNK as usize * CHUNK as usize);
    if to <= from {
        return Ok(rec.received);
    }
    let s = store.clone();
    let piece = content[from..to].to_vec();
    let total = rec.total_size;
    let (ing, durable) = tokio::task::spawn_blocking(move || {
        let mut ing = s.resume_ingest(total, &rows)?;
        ing.write(&piece)?;
        let d = ing.make_durable()?;
        Ok::<_, BlobError>((ing, d))
    })
    .await
    .map_err(|e| BlobError::Unavailable(e.to_string()))??;
    let mut ing = ing;
    let n = store.append_upload(id, rec.session, &durable).await?;
    ing.committed(&durable);
    Ok(n)
}

/// Resumes an upload from what the index holds and completes it: the blob must be `content`.
async fn resume_and_complete(store: &Store, id: &str, content: &[u8], acked: u64, seed: u64) {
    let (rec, rows) = store
        .claim_upload(id)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: claim {id}: {e}"));
    assert!(
        rec.received >= acked,
        "seed {seed}: upload {id} resumes at {} but {acked} bytes were acknowledged",
        rec.received
    );
    let s = store.clone();
    let rest = content[rec.received as usize..].to_vec();
    let total = rec.total_size;
    let (fin, _) = tokio::task::spawn_blocking(move || {
        let mut ing = s.resume_ingest(total, &rows)?;
        ing.write(&rest)?;
        ing.finish()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("seed {seed}: resume {id}: {e}"));
    assert_eq!(fin.blob.key, *blake3::hash(content).as_bytes(), "seed {seed}: {id} key");
    let b = store
        .complete_upload(id, rec.session, fin)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: complete {id}: {e}"));
    let mut out = Vec::new();
    for (h, &sz) in b.chunk_hashes.iter().zip(&b.chunk_sizes) {
        let h: [u8; 32] = h.as_slice().try_into().unwrap();
        out.extend_from_slice(
            &store
                .read_chunk(&h, sz)
                .unwrap_or_else(|e| panic!("seed {seed}: read {id}: {e}")),
        );
    }
    assert!(out == content, "seed {seed}: upload {id} completed with other content");
}

/// What a key may hold after the crash: the last acknowledged state, plus whatever
/// unacknowledged writes came after it.
type Model = HashMap<String, Vec<Option<Vec<u8>>>>;

fn note(model: &mut Model, key: &str, value: Option<Vec<u8>>, acked: bool) {
    let e = model.entry(key.to_string()).or_insert_with(|| vec![None]);
    if acked {
        *e = vec![value];
    } else {
        e.push(value);
    }
}

fn check(store: &Store, model: &Model, seed: u64, when: &str) {
    for (key, allowed) in model {
        let got = read(store, key).unwrap_or_else(|e| panic!("seed {seed} {when}: reading {key}: {e}"));
        assert!(
            allowed.contains(&got),
            "seed {seed} {when}: {key} holds {:?} bytes, allowed {:?}",
            got.as_ref().map(|g| g.len()),
            allowed.iter().map(|a| a.as_ref().map(|v| v.len())).collect::<Vec<_>>()
        );
    }
}

/// Runs one seed; returns whether the power went during the workload, the disk ops done and
/// the resumable uploads with an acknowledged append.
async fn run(seed: u64) -> (bool, u64, u64, u64) {
    let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let disk = SimDisk::new(seed);
    let fatal = Arc::new(AtomicUsize::new(0));
    let store = open(&disk, &fatal).expect("open a new store");
    let pool = contents();
    let mut model = Model::new();
    let mut uploads = Uploads::new();
    // The workload takes about 800 disk operations; the power goes anywhere in the first
    // 600 (so almost every seed crashes mid-workload, at a different point).
    disk.fail_after(1 + rng.below(600));
    for _ in 0..40 {
        match rng.below(8) {
            0 | 1 => {
                let key = format!("k{}", rng.below(6));
                let data = pool[rng.below(pool.len() as u64) as usize].clone();
                let ok = put(&store, &key, &data).await.is_ok();
                note(&mut model, &key, Some(data), ok);
            }
            2 => {
                // Several puts at once: one group commit.
                let jobs: Vec<(String, Vec<u8>)> = (0..3)
                    .map(|i| {
                        (
                            format!("g{}-{i}", rng.below(3)),
                            pool[rng.below(pool.len() as u64) as usize].clone(),
                        )
                    })
                    .collect();
                let results = futures_util::future::join_all(jobs.iter().map(|(k, d)| put(&store, k, d))).await;
                for ((k, d), r) in jobs.into_iter().zip(results) {
                    note(&mut model, &k, Some(d), r.is_ok());
                }
            }
            3 => {
                let key = format!("k{}", rng.below(6));
                match store.delete_file(&key).await {
                    Ok(_) | Err(BlobError::NotFound(_)) => note(&mut model, &key, None, true),
                    Err(_) => note(&mut model, &key, None, false),
                }
            }
            6 => {
                // A resumable upload starts (its content never repeats another's).
                let id = format!("u{}", uploads.len());
                let len = (2 + rng.below(4)) * CHUNK as u64 + rng.below(CHUNK as u64);
                let mut content = vec![0; len as usize];
                blake3::Hasher::new()
                    .update(id.as_bytes())
                    .update(&seed.to_le_bytes())
                    .finalize_xof()
                    .fill(&mut content);
                let ok = store.create_upload(&id, len, HashMap::new()).await.is_ok();
                uploads.insert(id, (content, ok, 0));
            }
            7 => {
                // An append from a new session, as after a reconnect.
                if uploads.is_empty() {
                    continue;
                }
                let id = format!("u{}", rng.below(uploads.len() as u64));
                let n = 1 + rng.below(2);
                if let Some((content, _, acked)) = uploads.get_mut(&id)
                    && let Ok(got) = append(&store, &id, content, n).await
                {
                    *acked = (*acked).max(got);
                }
            }
            4 => {
                // Sealed segments with dead chunks are compacted by the GC pass.
                if rng.below(2) == 0 {
                    store.seal_segments();
                }
                let _ = store.collect_garbage().await;
            }
            _ => {
                let _ = tokio::task::spawn_blocking({
                    let s = store.clone();
                    move || s.remove_orphan_chunk_files()
                })
                .await;
            }
        }
    }
    drop(store);
    let crashed = disk.failed();
    let ops = disk.ops();
    disk.power_loss();
    let store = open(&disk, &fatal).unwrap_or_else(|e| panic!("seed {seed}: reopen after power loss: {e}"));
    check(&store, &model, seed, "after power loss");
    let replayed = store.metrics().journal_replayed.get();
    // GC and a full orphan sweep must not take anything still referenced.
    store
        .collect_garbage()
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: gc: {e}"));
    for _ in 0..16 {
        store.remove_orphan_chunk_files().unwrap();
    }
    check(&store, &model, seed, "after GC");
    // Every resumable upload whose start was acknowledged resumes from at least its last
    // acknowledged offset and completes with its content.
    for (id, (content, created, acked)) in &uploads {
        if *created || store.get_upload(id).is_ok() {
            resume_and_complete(&store, id, content, *acked, seed).await;
        }
    }
    // And the store still takes writes.
    put(&store, "after", b"after the crash").await.unwrap();
    assert_eq!(fatal.load(Ordering::SeqCst), 0, "seed {seed}: the committer panicked");
    let appended = uploads.values().filter(|u| u.2 > 0).count() as u64;
    (crashed, ops, appended, replayed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_write_is_lost_on_power_loss() {
    let seeds: u64 = std::env::var("PV_POWER_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let started = Instant::now();
    let mut crashed = 0;
    let mut ops = 0;
    let mut appended = 0;
    let mut replayed = 0;
    for seed in 1..=seeds {
        let (c, n, a, r) = run(seed).await;
        crashed += c as u64;
        ops += n;
        appended += a;
        replayed += r;
    }
    eprintln!(
        "power-loss test: {seeds} seeds, {crashed} lost power mid-workload, {ops} disk operations, {appended} resumable uploads with acknowledged appends, {replayed} small puts replayed from the index journal, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Small puts are durable through the journal: the crashes must have made some replay.
    assert!(replayed > 0, "no seed replayed the index journal");
    assert!(
        appended * 2 >= seeds,
        "only {appended} acknowledged appends in {seeds} seeds"
    );
    // Most seeds must really crash inside the workload, or the test proves little.
    assert!(
        crashed * 4 >= seeds * 3,
        "only {crashed} of {seeds} seeds crashed mid-workload"
    );
}

/// Small puts are acknowledged once their batch is in the index journal: with the power gone
/// before the index ever made them durable, the restart applies them again, and a durable
/// commit (a delete) in between keeps the order right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_puts_acknowledged_through_the_journal_survive_power_loss() {
    let disk = SimDisk::new(7);
    let fatal = Arc::new(AtomicUsize::new(0));
    let store = open(&disk, &fatal).unwrap();
    let body = |i: usize| format!("small object {i}").into_bytes();
    // Concurrent puts: batches of several, each one journal entry.
    let first: Vec<_> = (0..24).map(|i| (format!("a/{i}"), body(i))).collect();
    for r in futures_util::future::join_all(first.iter().map(|(k, d)| put(&store, k, d))).await {
        r.unwrap();
    }
    // A delete commits durably and empties the journal; the puts after it are journaled anew.
    store.delete_file("a/0").await.unwrap();
    let second: Vec<_> = (0..16).map(|i| (format!("b/{i}"), body(100 + i))).collect();
    for r in futures_util::future::join_all(second.iter().map(|(k, d)| put(&store, k, d))).await {
        r.unwrap();
    }
    // One key overwritten through the journal: the replay must keep the last value.
    put(&store, "a/1", b"overwritten").await.unwrap();
    let appends = store.metrics().journal_appends.with_label_values(&["ok"]).get();
    assert!(appends >= 2, "only {appends} journal appends");
    // The power goes before anything else reaches the disk (closing cannot flush either).
    disk.fail_after(0);
    drop(store);
    disk.power_loss();
    let store = open(&disk, &fatal).unwrap();
    let replayed = store.metrics().journal_replayed.get();
    assert_eq!(
        replayed, 17,
        "the 16 puts after the delete and the overwrite are replayed"
    );
    assert_eq!(read(&store, "a/0").unwrap(), None, "the delete stays");
    assert_eq!(read(&store, "a/1").unwrap().as_deref(), Some(&b"overwritten"[..]));
    for (k, d) in first.iter().skip(2).chain(&second) {
        assert_eq!(read(&store, k).unwrap().as_deref(), Some(d.as_slice()), "{k}");
    }
    assert_eq!(store.stats().files, 23 + 16, "counters replayed with the records");
    // Opened again, nothing is replayed twice (the replay was committed durably).
    drop(store);
    let store = open(&disk, &fatal).unwrap();
    assert_eq!(store.metrics().journal_replayed.get(), 0);
    assert_eq!(read(&store, "a/1").unwrap().as_deref(), Some(&b"overwritten"[..]));
    assert_eq!(fatal.load(Ordering::SeqCst), 0);
}

/// A replicated record carrying `data` inline, at clock `ms` (what a replica applies for a
/// small write).
fn inline_record(key: &str, data: &[u8], ms: u64) -> peervault_proto::v1::FileRecord {
    let h = blake3::hash(data);
    peervault_proto::v1::FileRecord {
        key: key.into(),
        blob_key: bytes::Bytes::copy_from_slice(h.as_bytes()),
        size: data.len() as i64,
        chunk_hashes: vec![bytes::Bytes::copy_from_slice(h.as_bytes())],
        chunk_sizes: vec![data.len() as u32],
        inline_data: bytes::Bytes::copy_from_slice(data),
        hlc: Some(peervault_proto::v1::HybridTimestamp {
            physical_ms: ms,
            logical: 0,
            node_id: "pod-0".into(),
        }),
        updated_at: Some(prost_types::Timestamp {
            seconds: (ms / 1000) as i64,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn replicated_small_records_acknowledged_through_the_journal_survive_power_loss() {
    let disk = SimDisk::new(11);
    let fatal = Arc::new(AtomicUsize::new(0));
    let store = open(&disk, &fatal).unwrap();
    let body = |i: usize| format!("replicated small object {i}").into_bytes();
    let recs: Vec<_> = (0..24)
        .map(|i| inline_record(&format!("r/{i}"), &body(i), 1_000 + i as u64))
        .collect();
    for r in futures_util::future::join_all(recs.iter().map(|r| store.apply_record(r.clone(), None))).await {
        assert!(r.unwrap().0);
    }
    let appends = store.metrics().journal_appends.with_label_values(&["ok"]).get();
    assert!(appends >= 1, "the records went through the journal ({appends} appends)");
    // A newer clock overwrites; an older one is refused; both through the journal.
    assert!(
        store
            .apply_record(inline_record("r/1", b"newer", 5_000), None)
            .await
            .unwrap()
            .0
    );
    assert!(
        !store
            .apply_record(inline_record("r/2", b"older", 10), None)
            .await
            .unwrap()
            .0
    );
    // A small put of this pod's own in between: its own kind of entry, in order.
    put(&store, "own", b"own bytes").await.unwrap();
    assert!(
        store
            .apply_record(inline_record("r/3", b"after the put", 6_000), None)
            .await
            .unwrap()
            .0
    );
    assert!(store.metrics().journal_appends.with_label_values(&["ok"]).get() > appends);
    disk.fail_after(0);
    drop(store);
    disk.power_loss();
    let store = open(&disk, &fatal).unwrap();
    assert!(
        store.metrics().journal_replayed.get() >= 27,
        "24 records, 2 overwrites, 1 put replayed"
    );
    assert_eq!(read(&store, "r/1").unwrap().as_deref(), Some(&b"newer"[..]));
    assert_eq!(
        read(&store, "r/2").unwrap().as_deref(),
        Some(body(2).as_slice()),
        "the older record stays refused"
    );
    assert_eq!(read(&store, "r/3").unwrap().as_deref(), Some(&b"after the put"[..]));
    assert_eq!(read(&store, "own").unwrap().as_deref(), Some(&b"own bytes"[..]));
    for (i, r) in recs.iter().enumerate().skip(4) {
        assert_eq!(
            read(&store, &r.key).unwrap().as_deref(),
            Some(body(i).as_slice()),
            "{}",
            r.key
        );
    }
    // The clocks came back with the records: an older write is still refused after the replay.
    assert!(
        !store
            .apply_record(inline_record("r/1", b"stale", 4_000), None)
            .await
            .unwrap()
            .0
    );
    assert_eq!(fatal.load(Ordering::SeqCst), 0);
}
