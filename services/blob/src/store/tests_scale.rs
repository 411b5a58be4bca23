//! Scale fixtures, run on demand (ignored in CI): fills an index directly with many small files
//! so restart-to-ready after kill -9 can be measured at 10 M files or a 10 GiB index.
//!
//! `PV_GEN_DIR=<data-dir> PV_GEN_FILES=10000000 PV_GEN_PAD=0 cargo test -p peervault-blob --lib
//! generate_index -- --ignored` writes `<data-dir>/blob/index.redb` (PV_GEN_PAD bytes of metadata
//! per file make the index larger for the same count).

use std::collections::HashMap;

use prost::Message;

use super::{
    index::{self, meta},
    records::{BlobRec, ChunkRec, FileRec},
    *,
};

#[test]
#[ignore]
fn generate_index() {
    let Ok(dir) = std::env::var("PV_GEN_DIR") else {
        eprintln!("set PV_GEN_DIR");
        return;
    };
    let files: u64 = std::env::var("PV_GEN_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let pad: usize = std::env::var("PV_GEN_PAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let root = Path::new(&dir).join("blob");
    // Open once through the store so the layout and tables are the real ones.
    drop(Store::open(&root, BlobConfig::default(), BlobMetrics::new(None).unwrap()).unwrap());
    let db = Database::builder().create(root.join("index.redb")).unwrap();
    let started = std::time::Instant::now();
    let batch = 100_000u64;
    let mut done = 0u64;
    let mut stored = 0u64;
    while done < files {
        let mut txn = db.begin_write().unwrap();
        txn.set_quick_repair(true);
        {
            let mut f = txn.open_table(index::FILES).unwrap();
            let mut b = txn.open_table(index::BLOBS).unwrap();
            let mut c = txn.open_table(index::CHUNKS).unwrap();
            let mut inl = txn.open_table(index::INLINE).unwrap();
            for i in done..(done + batch).min(files) {
                let data = format!("content {i:012}");
                let hash = *blake3::hash(data.as_bytes()).as_bytes();
                let key = format!("gen/{i:012}");
                let metadata = if pad > 0 {
                    HashMap::from([("pad".to_string(), "x".repeat(pad))])
                } else {
                    HashMap::new()
                };
                let rec = FileRec {
                    key: key.clone(),
                    blob_key: hash.to_vec(),
                    size: data.len() as u64,
                    content_type: "text/plain".into(),
                    name: key.clone(),
                    metadata,
                    created_ns: 1,
                    updated_ns: 1,
                    hlc: None,
                };
                f.insert(key.as_str(), rec.encode_to_vec().as_slice()).unwrap();
                let blob = BlobRec {
                    size: data.len() as u64,
                    chunk_hashes: vec![hash.to_vec()],
                    chunk_sizes: vec![data.len() as u32],
                    created_ns: 1,
                    file_refs: 1,
                    ..Default::default()
                };
                b.insert(&hash[..], blob.encode_to_vec().as_slice()).unwrap();
                let chunk = ChunkRec {
                    refs: 1,
                    size: data.len() as u32,
                    inline: true,
                    loc: None,
                };
                c.insert(&hash[..], chunk.encode_to_vec().as_slice()).unwrap();
                inl.insert(&hash[..], data.as_bytes()).unwrap();
                stored += data.len() as u64;
            }
            let mut m = txn.open_table(index::META).unwrap();
            let n = (done + batch).min(files);
            for k in [meta::FILE_COUNT, meta::BLOB_COUNT, meta::CHUNK_COUNT] {
                m.insert(k, n).unwrap();
            }
            m.insert(meta::STORAGE_USED, stored).unwrap();
            m.insert(meta::LOGICAL_BYTES, stored).unwrap();
            m.insert(meta::FILE_GEN, n).unwrap();
        }
        txn.commit().unwrap();
        done = (done + batch).min(files);
        if done.is_multiple_of(1_000_000) || done == files {
            eprintln!("{done} files, {:.0} s", started.elapsed().as_secs_f64());
        }
    }
    drop(db);
    let size = std::fs::metadata(root.join("index.redb")).unwrap().len();
    eprintln!("index: {files} files, {:.2} GiB", size as f64 / (1u64 << 30) as f64);
}
