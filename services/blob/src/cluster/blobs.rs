//! Blobs of the Graviton API (UploadService, BlobService) on a pod that replicates. A blob has
//! no file key to be placed by, so each one is kept as a record under
//! [`BLOB_RECORD_PREFIX`] and its hex content key: placed, written to a majority, handed off,
//! repaired, listed and deleted (tombstones) exactly as a file is. File listings never show
//! these records.

use peervault_proto::v1::FileRecord;

use super::{Cluster, Replicas};
use crate::{
    error::{BlobError, Result},
    store::{
        Finished, hex, now_ns,
        records::FileRec,
        replica::{BLOB_RECORD_PREFIX, blob_record_key},
    },
};

fn not_found(key: &[u8; 32]) -> BlobError {
    BlobError::NotFound(format!("blob {} not found", hex(key)))
}

/// The content key of a blob record (`None` for any other record).
pub fn blob_key_of(r: &FileRecord) -> Option<[u8; 32]> {
    r.key.strip_prefix(BLOB_RECORD_PREFIX)?;
    <[u8; 32]>::try_from(r.blob_key.as_ref()).ok()
}

impl Cluster {
    /// Commits a completed Graviton upload as a replicated blob record: its chunks go to the
    /// record's other owners (read back from this pod's copy, a window at a time: the owners
    /// are known only once the content key is), then the record is written to a majority.
    /// Without a majority the write fails with UNAVAILABLE and the blob is visible nowhere.
    pub async fn put_blob(&self, content: Finished) -> Result<(FileRec, Replicas)> {
        let key = blob_record_key(&content.blob.key);
        let now = now_ns();
        let rec = FileRec {
            key: key.clone(),
            blob_key: vec![],
            size: 0,
            content_type: content.blob.content_type.clone(),
            name: String::new(),
            metadata: content.blob.attributes.clone(),
            created_ns: now,
            updated_ns: now,
            hlc: None,
        };
        let replicator = self.replicator(&key);
        self.put_file(rec, content, replicator).await
    }

    /// The live record of the blob `key` from a majority of its owners; NOT_FOUND when there
    /// is none (or it was deleted).
    pub async fn blob_record(&self, key: &[u8; 32], with_data: bool) -> Result<FileRecord> {
        let rkey = blob_record_key(key);
        if self.is_solo() {
            let s = self.store().clone();
            let held = tokio::task::spawn_blocking(move || s.replica_record(&rkey, with_data))
                .await
                .map_err(|e| BlobError::Unavailable(format!("read task failed: {e}")))??;
            return match held {
                Some(r) if !r.deleted => Ok(r),
                _ => Err(not_found(key)),
            };
        }
        match self.live_record(&rkey, with_data, false).await {
            Ok((r, _, _)) => Ok(r),
            Err(BlobError::NotFound(_)) => Err(not_found(key)),
            Err(e) => Err(e),
        }
    }

    /// DeleteBlob: a tombstone for the blob's record, written to a majority of its owners.
    /// Returns the deleted record.
    pub async fn delete_blob(&self, key: &[u8; 32]) -> Result<FileRec> {
        match self.delete_file(&blob_record_key(key)).await {
            Err(BlobError::NotFound(_)) => Err(not_found(key)),
            other => other,
        }
    }

    /// Blob records of the whole store in content-key order: keys starting with `prefix`
    /// after `start_after` (both raw key bytes), at most `limit`, and whether more follow.
    pub async fn list_blobs(&self, prefix: &[u8], start_after: &[u8], limit: usize) -> Result<(Vec<FileRecord>, bool)> {
        // Hex keeps the byte order, prefixes included.
        let prefix = format!("{BLOB_RECORD_PREFIX}{}", hex(prefix));
        let after = (!start_after.is_empty()).then(|| format!("{BLOB_RECORD_PREFIX}{}", hex(start_after)));
        let (records, more, _) = self.list_merged(&prefix, after.as_deref(), 0, limit, "", false).await?;
        Ok((records, more))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::replica::{display_key, is_internal_key};

    #[test]
    fn blob_records_are_internal_and_keep_the_content_key() {
        let key = [0xab; 32];
        let rkey = blob_record_key(&key);
        assert!(is_internal_key(&rkey));
        assert!(
            crate::validate::file_key(&rkey).is_err(),
            "no user can write a blob record"
        );
        assert_eq!(display_key(&rkey), format!("blob:{}", hex(&key)));
        assert_eq!(display_key("photos/a.jpg"), "photos/a.jpg");
        let r = FileRecord {
            key: rkey,
            blob_key: key.to_vec().into(),
            ..Default::default()
        };
        assert_eq!(blob_key_of(&r), Some(key));
        let file = FileRecord {
            key: "photos/a.jpg".into(),
            blob_key: key.to_vec().into(),
            ..Default::default()
        };
        assert_eq!(blob_key_of(&file), None);
    }

    #[test]
    fn hex_listing_bounds_keep_the_byte_order() {
        let keys: [&[u8]; 5] = [&[0x00], &[0x00, 0xff], &[0x0a], &[0x9f, 0x01], &[0xa0]];
        for w in keys.windows(2) {
            assert!(w[0] < w[1]);
            assert!(hex(w[0]) < hex(w[1]), "{:?} vs {:?}", w[0], w[1]);
        }
    }
}
