//! Persistence of peers added and removed by hand, behind one trait: a JSON file in the data
//! directory (written atomically), or a Kubernetes ConfigMap written with optimistic
//! concurrency so that several peer replicas agree.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use futures_util::future::BoxFuture;

use crate::{error::PeerError, registry::ManualPeers};

/// A change to the manual peers: gets the current set, returns the new one or refuses.
pub type Change = Box<dyn Fn(&ManualPeers) -> Result<ManualPeers, PeerError> + Send + Sync>;

/// Where manual peers are kept.
pub trait ManualStore: Send + Sync {
    /// Where, for logs and errors.
    fn describe(&self) -> String;
    /// The stored set (empty when nothing was stored yet).
    fn load(&self) -> BoxFuture<'_, Result<ManualPeers, PeerError>>;
    /// Applies `change` to the stored set and stores the result, atomically with respect to
    /// other writers; returns the stored result.
    fn update(&self, change: Change) -> BoxFuture<'_, Result<ManualPeers, PeerError>>;
}

/// The on-disk document.
#[derive(serde::Serialize, serde::Deserialize)]
struct Document {
    format: u32,
    #[serde(flatten)]
    peers: ManualPeers,
}

/// Parses a stored document.
pub fn decode(text: &str, origin: &str) -> Result<ManualPeers, PeerError> {
    let doc: Document = serde_json::from_str(text).map_err(|e| PeerError::Store {
        path: origin.to_string(),
        reason: format!("not a valid peer list ({e}); fix or remove it"),
    })?;
    if doc.format != 1 {
        return Err(PeerError::Store {
            path: origin.to_string(),
            reason: format!("format {} is not supported (expected 1)", doc.format),
        });
    }
    Ok(doc.peers)
}

/// Serializes a set for storing.
pub fn encode(peers: &ManualPeers) -> String {
    let doc = Document {
        format: 1,
        peers: peers.clone(),
    };
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// A JSON file, replaced atomically (temporary file, fsync, rename, fsync of the directory).
pub struct FileStore {
    path: PathBuf,
    lock: tokio::sync::Mutex<()>,
}

impl FileStore {
    /// A store at `path` (its directory is created on first write).
    pub fn new(path: PathBuf) -> Arc<Self> {
        Arc::new(FileStore {
            path,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> PeerError {
        PeerError::Store {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }

    fn read_blocking(path: &Path) -> Result<Option<String>, std::io::Error> {
        match std::fs::read_to_string(path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_blocking(path: &Path, text: &str) -> Result<(), std::io::Error> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    async fn read(&self) -> Result<ManualPeers, PeerError> {
        let path = self.path.clone();
        let text = tokio::task::spawn_blocking(move || Self::read_blocking(&path))
            .await
            .map_err(|e| self.err(e))?
            .map_err(|e| self.err(e))?;
        match text {
            Some(t) => decode(&t, &self.path.display().to_string()),
            None => Ok(ManualPeers::default()),
        }
    }
}

impl ManualStore for FileStore {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn load(&self) -> BoxFuture<'_, Result<ManualPeers, PeerError>> {
        Box::pin(async move {
            let _g = self.lock.lock().await;
            // A leftover temporary file is an interrupted write: the previous file stands.
            let _ = std::fs::remove_file(self.path.with_extension("json.tmp"));
            self.read().await
        })
    }

    fn update(&self, change: Change) -> BoxFuture<'_, Result<ManualPeers, PeerError>> {
        Box::pin(async move {
            let _g = self.lock.lock().await;
            let current = self.read().await?;
            let next = change(&current)?;
            let text = encode(&next);
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || Self::write_blocking(&path, &text))
                .await
                .map_err(|e| self.err(e))?
                .map_err(|e| self.err(e))?;
            Ok(next)
        })
    }
}

/// Key of the peer list inside the ConfigMap.
pub const CONFIGMAP_KEY: &str = "peers.json";
/// Read-modify-write attempts before a conflict is reported.
const CONFLICT_RETRIES: usize = 16;

/// Wait before retry `attempt` after a conflict: exponential from 5 ms, capped at 320 ms, with
/// full jitter so that writers that collided once do not collide again in lockstep.
fn conflict_backoff(attempt: usize) -> std::time::Duration {
    let cap = 5u64 << attempt.min(6);
    std::time::Duration::from_millis(fastrand::u64(1..=cap))
}

/// A ConfigMap the peer service owns, written with optimistic concurrency: each update replaces
/// the object at the resourceVersion it read, and a concurrent writer's change (409 Conflict, or
/// AlreadyExists on first creation) makes it read and apply the change again. Needs `get`,
/// `create` and `update` on that ConfigMap.
pub struct ConfigMapStore {
    api: kube::Api<k8s_openapi::api::core::v1::ConfigMap>,
    namespace: String,
    name: String,
}

impl ConfigMapStore {
    /// The ConfigMap `name` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Arc<Self> {
        Arc::new(ConfigMapStore {
            api: kube::Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> PeerError {
        PeerError::Store {
            path: self.describe(),
            reason: e.to_string(),
        }
    }

    async fn read(&self) -> Result<(Option<k8s_openapi::api::core::v1::ConfigMap>, ManualPeers), PeerError> {
        let cm = self.api.get_opt(&self.name).await.map_err(|e| self.err(e))?;
        let peers = match cm
            .as_ref()
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get(CONFIGMAP_KEY))
        {
            Some(text) => decode(text, &self.describe())?,
            None => ManualPeers::default(),
        };
        Ok((cm, peers))
    }
}

impl ManualStore for ConfigMapStore {
    fn describe(&self) -> String {
        format!("configmap {}/{}", self.namespace, self.name)
    }

    fn load(&self) -> BoxFuture<'_, Result<ManualPeers, PeerError>> {
        Box::pin(async move { Ok(self.read().await?.1) })
    }

    fn update(&self, change: Change) -> BoxFuture<'_, Result<ManualPeers, PeerError>> {
        Box::pin(async move {
            use k8s_openapi::api::core::v1::ConfigMap;
            use kube::api::PostParams;
            for attempt in 0..CONFLICT_RETRIES {
                let (cm, current) = self.read().await?;
                let next = change(&current)?;
                let text = encode(&next);
                let result = match cm {
                    Some(mut cm) => {
                        // `metadata.resourceVersion` stays as read: the server refuses the
                        // replace with 409 if anyone wrote in between.
                        cm.data
                            .get_or_insert_with(Default::default)
                            .insert(CONFIGMAP_KEY.into(), text);
                        self.api.replace(&self.name, &PostParams::default(), &cm).await
                    }
                    None => {
                        let cm = ConfigMap {
                            metadata: kube::api::ObjectMeta {
                                name: Some(self.name.clone()),
                                labels: Some(
                                    [("app.kubernetes.io/managed-by".to_string(), "peervault-peer".to_string())].into(),
                                ),
                                ..Default::default()
                            },
                            data: Some([(CONFIGMAP_KEY.to_string(), text)].into()),
                            ..Default::default()
                        };
                        self.api.create(&PostParams::default(), &cm).await
                    }
                };
                match result {
                    Ok(_) => return Ok(next),
                    Err(kube::Error::Api(st)) if st.is_conflict() || st.is_already_exists() => {
                        tracing::debug!(store = %self.describe(), attempt, "concurrent write; retrying");
                        tokio::time::sleep(conflict_backoff(attempt)).await;
                    }
                    Err(e) => return Err(self.err(e)),
                }
            }
            Err(PeerError::Conflict(self.describe()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ManualPeer;

    #[tokio::test]
    async fn a_file_store_round_trips_and_survives_a_leftover_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer").join("peers.json");
        let store = FileStore::new(path.clone());
        assert_eq!(store.load().await.unwrap(), ManualPeers::default());
        let stored = store
            .update(Box::new(|cur| {
                let mut n = cur.clone();
                n.added.insert(
                    "x".into(),
                    ManualPeer {
                        address: "10.0.0.1".into(),
                        port: 8082,
                        metadata: Default::default(),
                        created_at_ms: 5,
                    },
                );
                n.removed.insert("y".into());
                Ok(n)
            }))
            .await
            .unwrap();
        std::fs::write(path.with_extension("json.tmp"), "{ half a wri").unwrap();
        let again = FileStore::new(path.clone());
        assert_eq!(again.load().await.unwrap(), stored);
        assert!(!path.with_extension("json.tmp").exists());
        // A refused change leaves the file as it was.
        let err = again
            .update(Box::new(|_| Err(PeerError::InvalidArgument("no".into()))))
            .await
            .unwrap_err();
        assert!(matches!(err, PeerError::InvalidArgument(_)));
        assert_eq!(again.load().await.unwrap(), stored);
    }

    #[tokio::test]
    async fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.json");
        std::fs::write(&path, "not json").unwrap();
        let err = FileStore::new(path).load().await.unwrap_err().to_string();
        assert!(err.contains("peers.json"), "{err}");
    }
}
