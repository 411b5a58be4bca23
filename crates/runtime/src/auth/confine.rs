//! Key-prefix confinement: the one place that says how a caller limited to a key prefix (an API
//! key or JWT subject with `key_prefix`) is held inside it, for every RPC of the protocol.
//!
//! The prefix travels in the [`Caller`] — also across a facade, which forwards the original
//! caller (see [`super::forward`]) — and is enforced here:
//! - [`Confinement::Unconfinable`] RPCs (content-addressed blobs, uploads by hash) are refused by
//!   the auth layer itself for limited callers, before any handler runs;
//! - [`Confinement::Keyed`] RPCs name a file key: the handler checks it with [`check_key`];
//! - [`Confinement::FileEvents`] streams withhold other keys' file events: the events hub filters
//!   with [`event_prefix`];
//! - [`Confinement::None`] RPCs touch no file (system, peers, health).
//!
//! A test checks that every RPC of the protocol has exactly one entry.

use tonic::Status;

use crate::identity::Caller;

/// How an RPC relates to file keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confinement {
    /// Touches no file.
    None,
    /// Names a file key (or lists keys): the handler checks it with [`check_key`] / narrows to
    /// the prefix.
    Keyed,
    /// Streams file events: other keys' events are withheld.
    FileEvents,
    /// Reaches content without a key (by hash): refused for prefix-limited callers.
    Unconfinable,
}

use Confinement::*;

/// The confinement of every RPC, by gRPC path.
pub const CONFINEMENT_TABLE: &[(&str, Confinement)] = &[
    ("/grpc.health.v1.Health/Check", None),
    ("/grpc.health.v1.Health/Watch", None),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", None),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None),
    ("/peervault.v1.FileService/UploadFile", Keyed),
    ("/peervault.v1.FileService/DownloadFile", Keyed),
    ("/peervault.v1.FileService/ListFiles", Keyed),
    ("/peervault.v1.FileService/GetFile", Keyed),
    ("/peervault.v1.FileService/DeleteFile", Keyed),
    ("/peervault.v1.FileService/UpdateFileMetadata", Keyed),
    ("/peervault.v1.BlobService/GetBlob", Unconfinable),
    ("/peervault.v1.BlobService/StatBlob", Unconfinable),
    ("/peervault.v1.BlobService/DeleteBlob", Unconfinable),
    ("/peervault.v1.BlobService/ListBlobs", Unconfinable),
    ("/peervault.v1.UploadService/Upload", Unconfinable),
    ("/peervault.v1.PeerService/ListPeers", None),
    ("/peervault.v1.PeerService/GetPeer", None),
    ("/peervault.v1.PeerService/AddPeer", None),
    ("/peervault.v1.PeerService/RemovePeer", None),
    ("/peervault.v1.PeerService/GetPeerHealth", None),
    ("/peervault.v1.PeerService/WatchMembership", None),
    ("/peervault.v1.EventService/StreamFileOperations", FileEvents),
    ("/peervault.v1.EventService/StreamPeerEvents", None),
    ("/peervault.v1.EventService/StreamSystemEvents", None),
    ("/peervault.v1.EventService/Subscribe", FileEvents),
    ("/peervault.v1.EventService/Publish", None),
    ("/peervault.v1.SystemService/GetSystemInfo", None),
    ("/peervault.v1.SystemService/GetMetrics", None),
    ("/peervault.v1.SystemService/HealthCheck", None),
    ("/peervault.v1.AuthService/CreateApiKey", Keyed),
    ("/peervault.v1.AuthService/ListApiKeys", None),
    ("/peervault.v1.AuthService/RevokeApiKey", None),
    ("/peervault.v1.AuthService/VerifyApiKey", None),
    ("/peervault.v1.PeerVaultService/UploadFile", Keyed),
    ("/peervault.v1.PeerVaultService/DownloadFile", Keyed),
    ("/peervault.v1.PeerVaultService/ListFiles", Keyed),
    ("/peervault.v1.PeerVaultService/GetFile", Keyed),
    ("/peervault.v1.PeerVaultService/DeleteFile", Keyed),
    ("/peervault.v1.PeerVaultService/UpdateFileMetadata", Keyed),
    ("/peervault.v1.PeerVaultService/ListPeers", None),
    ("/peervault.v1.PeerVaultService/GetPeer", None),
    ("/peervault.v1.PeerVaultService/AddPeer", None),
    ("/peervault.v1.PeerVaultService/RemovePeer", None),
    ("/peervault.v1.PeerVaultService/GetPeerHealth", None),
    ("/peervault.v1.PeerVaultService/GetSystemInfo", None),
    ("/peervault.v1.PeerVaultService/GetMetrics", None),
    ("/peervault.v1.PeerVaultService/HealthCheck", None),
    ("/peervault.v1.PeerVaultService/StreamFileOperations", FileEvents),
    ("/peervault.v1.PeerVaultService/StreamPeerEvents", None),
    ("/peervault.v1.PeerVaultService/StreamSystemEvents", None),
    ("/peervault.v1.ReplicationService/HasChunks", Unconfinable),
    ("/peervault.v1.ReplicationService/PutChunks", Unconfinable),
    ("/peervault.v1.ReplicationService/GetChunk", Unconfinable),
    ("/peervault.v1.ReplicationService/PutRecord", Unconfinable),
    ("/peervault.v1.ReplicationService/ListRecords", Unconfinable),
    ("/peervault.v1.ReplicationService/CommitRecord", Unconfinable),
    ("/peervault.v1.ReplicationService/GetRecord", Unconfinable),
    ("/peervault.v1.ReplicationService/GetRecords", Unconfinable),
    ("/peervault.v1.ReplicationService/PutRecords", Unconfinable),
    ("/peervault.v1.ReplicationService/CommitRecords", Unconfinable),
    ("/peervault.v1.ReplicationService/Digests", Unconfinable),
    ("/peervault.v1.ReplicationService/PutApiKeys", Unconfinable),
];

/// The confinement of a path; paths outside the protocol are [`Confinement::Unconfinable`].
pub fn confinement_for(path: &str) -> Confinement {
    CONFINEMENT_TABLE
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, c)| *c)
        .unwrap_or(Unconfinable)
}

/// The refusal for a prefix-limited caller on an [`Confinement::Unconfinable`] RPC.
pub fn check_path(prefix: Option<&str>, path: &str) -> Result<(), Status> {
    match prefix {
        Some(p) if confinement_for(path) == Unconfinable => Err(Status::permission_denied(format!(
            "{path}: this credential is limited to keys under '{p}' and cannot use calls that reach content without a key"
        ))),
        _ => Ok(()),
    }
}

/// Refuses `key` outside the prefix the caller is limited to.
pub fn check_key(prefix: Option<&str>, key: &str) -> Result<(), Status> {
    match prefix {
        Some(p) if !key.starts_with(p) => Err(Status::permission_denied(format!(
            "this credential is limited to keys under '{p}'"
        ))),
        _ => Ok(()),
    }
}

/// The prefix a file-event stream of `caller` is narrowed to.
pub fn event_prefix(caller: Option<&Caller>) -> Option<String> {
    caller.and_then(|c| c.key_prefix.clone())
}

/// Whether a caller may grant a credential with `scopes` limited to `prefix` (empty: none): the
/// new grant must fit inside the caller's own — no scope it lacks, and inside its prefix.
pub fn check_grant(caller: &Caller, scopes: super::ScopeSet, prefix: &str) -> Result<(), Status> {
    if !scopes.within(caller.scopes) {
        return Err(Status::permission_denied(format!(
            "a new key may hold only scopes its creator holds ({}); asked for {}",
            caller.scopes.names().join(", "),
            scopes.names().join(", ")
        )));
    }
    if let Some(own) = &caller.key_prefix
        && !prefix.starts_with(own.as_str())
    {
        return Err(Status::permission_denied(format!(
            "this credential is limited to keys under '{own}': a new key must be limited to a prefix inside it"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_of_the_protocol_has_exactly_one_confinement() {
        let methods = peervault_proto::methods();
        for m in &methods {
            let n = CONFINEMENT_TABLE.iter().filter(|(p, _)| *p == m.path()).count();
            assert_eq!(n, 1, "{} has {n} entries in CONFINEMENT_TABLE", m.path());
        }
        assert_eq!(
            CONFINEMENT_TABLE.len(),
            super::super::ACCESS_TABLE.len(),
            "the two tables cover the same RPCs"
        );
    }

    #[test]
    fn keys_outside_the_prefix_and_keyless_calls_are_refused() {
        assert!(check_key(Some("a/"), "a/x").is_ok());
        assert!(check_key(Some("a/"), "b/x").is_err());
        assert!(check_key(Option::None, "b/x").is_ok());
        assert!(check_path(Some("a/"), "/peervault.v1.BlobService/GetBlob").is_err());
        assert!(check_path(Some("a/"), "/peervault.v1.FileService/GetFile").is_ok());
        assert!(check_path(Option::None, "/peervault.v1.BlobService/GetBlob").is_ok());
    }
}
