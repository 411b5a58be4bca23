//! The peer service crate. Its domain logic and gRPC adapter land with the peer-service issue;
//! until then `peervault serve peer` serves SystemService, health and reflection from the shared
//! runtime, and the peer RPCs answer UNIMPLEMENTED through the same router, auth and metrics.
#![forbid(unsafe_code)]
