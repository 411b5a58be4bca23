//! The events service crate. Its domain logic and gRPC adapter land with the events-service issue;
//! until then `peervault serve events` serves SystemService, health and reflection from the shared
//! runtime, and the events RPCs answer UNIMPLEMENTED through the same router, auth and metrics.
#![forbid(unsafe_code)]
