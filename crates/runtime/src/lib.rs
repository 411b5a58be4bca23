//! The runtime every PeerVault service shares: configuration (the operator contract), mutual
//! TLS with hot reload, the auth layer, gRPC server assembly with health and reflection,
//! metrics, tracing and the admin HTTP port.
//!
//! A role builds its services, hands them to [`server::Runtime::serve`], and gets the same
//! security, limits and observability as every other role.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod auth;
pub mod client;
pub mod config;
pub mod identity;
pub mod metrics;
pub mod server;
pub mod system;
pub mod telemetry;
pub mod time;
pub mod tls;

pub use config::ServeConfig;
pub use identity::{Caller, Identity};
pub use server::{Runtime, ServiceContext, Services, StartError};
