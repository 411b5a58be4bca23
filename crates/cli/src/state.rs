//! Remembers interrupted resumable uploads: one small JSON file per local file, naming the
//! upload id and the file's identity (path, size, modification time, server), so a `put
//! --resumable` run again continues where the killed one stopped.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// What identifies the content being uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Absolute path of the file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Its modification time, nanoseconds since the epoch.
    pub mtime_ns: u128,
    /// The server uploaded to.
    pub server: String,
}

impl Identity {
    /// The identity of the regular file at `path`.
    pub fn of(path: &Path, server: &str) -> anyhow::Result<Identity> {
        let abs = std::fs::canonicalize(path).with_context(|| format!("cannot read {}", path.display()))?;
        let meta = std::fs::metadata(&abs).with_context(|| format!("cannot read {}", path.display()))?;
        if !meta.is_file() {
            return Err(crate::usage(format!("{} is not a regular file", path.display())));
        }
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Ok(Identity {
            path: abs,
            size: meta.len(),
            mtime_ns,
            server: server.to_string(),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Record {
    identity: Identity,
    upload_id: String,
}

/// The folder of upload records.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Records kept in `dir` (created when first needed).
    pub fn new(dir: PathBuf) -> Store {
        Store { dir }
    }

    fn file(&self, id: &Identity) -> PathBuf {
        let name = blake3::hash(format!("{}\n{}", id.path.display(), id.server).as_bytes()).to_hex();
        self.dir.join(format!("upload-{}.json", &name[..24]))
    }

    /// The upload id of an interrupted upload of exactly this content, if any.
    pub fn find(&self, id: &Identity) -> Option<String> {
        let text = std::fs::read_to_string(self.file(id)).ok()?;
        let rec: Record = serde_json::from_str(&text).ok()?;
        (rec.identity == *id).then_some(rec.upload_id)
    }

    /// Saves (atomically) the upload id for this content.
    pub fn save(&self, id: &Identity, upload_id: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        let path = self.file(id);
        let tmp = path.with_extension("json.tmp");
        let rec = Record {
            identity: id.clone(),
            upload_id: upload_id.to_string(),
        };
        std::fs::write(&tmp, serde_json::to_vec(&rec)?).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Forgets the upload of this content (it completed).
    pub fn remove(&self, id: &Identity) {
        let _ = std::fs::remove_file(self.file(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_found_only_for_the_same_content() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.bin");
        std::fs::write(&f, b"hello").unwrap();
        let store = Store::new(dir.path().join("state"));
        let id = Identity::of(&f, "h:1").unwrap();
        assert_eq!(store.find(&id), None);
        store.save(&id, "u1").unwrap();
        assert_eq!(store.find(&id).as_deref(), Some("u1"));
        let other_server = Identity::of(&f, "h:2").unwrap();
        assert_eq!(store.find(&other_server), None);
        let mut changed = id.clone();
        changed.size = 6;
        assert_eq!(store.find(&changed), None);
        store.remove(&id);
        assert_eq!(store.find(&id), None);
    }
}
