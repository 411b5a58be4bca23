//! `peervault`: the PeerVault server. `peervault serve all` runs every service in one process
//! (the embedded default); `serve blob|peer|events` runs one service, as in Kubernetes.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use peervault_runtime::{Runtime, ServeConfig, Services};

#[derive(Parser)]
#[command(
    name = "peervault",
    version,
    about = "PeerVault: a Kubernetes-native distributed file and blob store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one role (or all of them) until SIGTERM/SIGINT.
    Serve {
        /// Which services this process runs.
        #[arg(value_enum)]
        role: Role,
        #[command(flatten)]
        config: ServeConfig,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Role {
    /// blob, peer and events in one process, on one gRPC port.
    All,
    /// The data plane: files, blobs, replication, PeerVaultService.
    Blob,
    /// The control plane: membership and health probing.
    Peer,
    /// Event fan-out over gRPC streams and WebSocket.
    Events,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Blob => "blob",
            Role::Peer => "peer",
            Role::Events => "events",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Serve { role, config } = cli.command;
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("peervault: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(role, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "peervault stopped");
            eprintln!("peervault: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(role: Role, config: ServeConfig) -> anyhow::Result<()> {
    let runtime = Runtime::start(config, role.name()).await?;
    let ctx = runtime.context().clone();
    let mut services = Services::new();
    match role {
        Role::All => {
            let upstreams = peervault_blob::Upstreams::from_context(&ctx, true, true);
            services.extend(peervault_blob::services(&ctx, upstreams)?);
        }
        Role::Blob => {
            let upstreams = peervault_blob::Upstreams::from_context(&ctx, false, false);
            services.extend(peervault_blob::services(&ctx, upstreams)?);
        }
        // Their services arrive with their issues; the runtime already serves SystemService.
        Role::Peer | Role::Events => {}
    }
    runtime.serve(services).await?;
    Ok(())
}
