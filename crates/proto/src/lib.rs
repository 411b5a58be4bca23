//! Generated protobuf and gRPC code for the `peervault.v1` package, plus the encoded file
//! descriptor set that reflection serves and the runtime reads to classify every RPC.
#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

/// Messages, service clients and service servers of `peervault.v1`.
pub mod v1 {
    tonic::include_proto!("peervault.v1");
}

/// The encoded `FileDescriptorSet` of every `.proto` file in `proto/` (imports included).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("peervault_descriptor");

/// One RPC of the protocol as read from the descriptor set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodInfo {
    /// Fully qualified service name, e.g. `peervault.v1.FileService`.
    pub service: String,
    /// Method name, e.g. `UploadFile`.
    pub method: String,
    /// Whether the client sends a stream of messages.
    pub client_streaming: bool,
    /// Whether the server answers with a stream of messages.
    pub server_streaming: bool,
}

impl MethodInfo {
    /// The HTTP/2 path of the RPC: `/<service>/<method>`.
    pub fn path(&self) -> String {
        format!("/{}/{}", self.service, self.method)
    }

    /// The conventional `grpc_type` label: `unary`, `client_stream`, `server_stream`, `bidi_stream`.
    pub fn grpc_type(&self) -> &'static str {
        match (self.client_streaming, self.server_streaming) {
            (false, false) => "unary",
            (true, false) => "client_stream",
            (false, true) => "server_stream",
            (true, true) => "bidi_stream",
        }
    }
}

/// Every service name of the `peervault.v1` package, in descriptor order.
pub fn service_names() -> Vec<String> {
    methods().into_iter().fold(Vec::new(), |mut acc, m| {
        if !acc.contains(&m.service) {
            acc.push(m.service);
        }
        acc
    })
}

/// Every RPC of the `peervault.v1` package.
pub fn methods() -> Vec<MethodInfo> {
    use prost::Message;
    // The set is produced by our own build script; failing to decode it is a build defect.
    let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("embedded descriptor set is valid");
    let mut out = Vec::new();
    for file in set.file {
        let package = file.package().to_string();
        if package != "peervault.v1" {
            continue;
        }
        for svc in &file.service {
            for m in &svc.method {
                out.push(MethodInfo {
                    service: format!("{package}.{}", svc.name()),
                    method: m.name().to_string(),
                    client_streaming: m.client_streaming(),
                    server_streaming: m.server_streaming(),
                });
            }
        }
    }
    out
}
