//! `peervault`: the PeerVault server. `peervault serve all` runs every service in one process
//! (the embedded default); `serve blob|peer|events` runs one service, as in Kubernetes.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod certs;
mod metric_names;
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

// Parsed once at start: the size of the `serve` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run one role (or all of them) until SIGTERM/SIGINT.
    Serve {
        /// Which services this process runs.
        #[arg(value_enum)]
        role: Role,
        // Boxed: the flag sets are large and the other commands are tiny (clippy's
        // large_enum_variant).
        #[command(flatten)]
        config: Box<ServeConfig>,
        #[command(flatten)]
        blob: Box<peervault_blob::BlobConfig>,
    },
    /// Certificates for deployments (the Helm chart's init container).
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Facts about the metrics this binary exports.
    #[command(subcommand)]
    Metrics(MetricsCommand),
}

#[derive(Subcommand)]
enum MetricsCommand {
    /// Print every metric name, one a line (the list dashboards and alert rules are checked against).
    Names,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Issue a service certificate (URI SAN identities, DNS names, IPs) signed by a CA.
    Issue(certs::IssueArgs),
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
    let (role, config, blob) = match cli.command {
        Command::Serve { role, config, blob } => (role, *config, *blob),
        Command::Metrics(MetricsCommand::Names) => {
            for name in metric_names::all() {
                println!("{name}");
            }
            return ExitCode::SUCCESS;
        }
        Command::Certs(CertsCommand::Issue(args)) => {
            return match certs::issue(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("peervault certs issue: error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("peervault: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(role, config, blob)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "peervault stopped");
            eprintln!("peervault: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(role: Role, config: ServeConfig, blob: peervault_blob::BlobConfig) -> anyhow::Result<()> {
    let runtime = Runtime::start(config, role.name()).await?;
    let ctx = runtime.context().clone();
    let mut services = Services::new();
    // The membership view the blob side uses; kept for the life of the process.
    let mut membership: Option<peervault_membership::MembershipClient> = None;
    match role {
        Role::All => {
            // Events first: blob and peer of this process publish to it.
            services.extend(peervault_events::start(&ctx).await?.services);
            let upstreams = peervault_blob::Upstreams::from_context(&ctx, true, true);
            // The peer service with a membership of this process itself (unless --peers says
            // otherwise), and the blob side subscribed to it.
            let own = ctx.self_endpoint();
            services.extend(start_peer(&ctx, vec![own.clone()], Some(own)).await?);
            membership = start_membership(&ctx, upstreams.peer.as_deref())?;
            let mut upstreams = upstreams;
            upstreams.membership = membership.as_ref().map(|m| m.view());
            services.extend(peervault_blob::services(&ctx, blob.clone(), upstreams).await?);
        }
        Role::Blob => {
            start_metrics_events(&ctx)?;
            let mut upstreams = peervault_blob::Upstreams::from_context(&ctx, false, false);
            membership = start_membership(&ctx, upstreams.peer.as_deref())?;
            upstreams.membership = membership.as_ref().map(|m| m.view());
            services.extend(peervault_blob::services(&ctx, blob.clone(), upstreams).await?);
        }
        Role::Peer => {
            start_metrics_events(&ctx)?;
            let events = ctx.config.events_endpoint.iter().cloned().collect();
            services.extend(start_peer(&ctx, events, None).await?);
        }
        Role::Events => {
            services.extend(peervault_events::start(&ctx).await?.services);
        }
    }
    runtime.serve(services).await?;
    drop(membership);
    Ok(())
}

/// Publishes this process's system, storage, network and performance metrics events to
/// `--events-endpoint` every `--metrics-interval` (blob and peer; events publishes its own).
fn start_metrics_events(ctx: &peervault_runtime::ServiceContext) -> anyhow::Result<()> {
    let endpoints: Vec<String> = ctx.config.events_endpoint.iter().cloned().collect();
    let publisher = peervault_events_client::EventPublisher::start(ctx, &endpoints)?;
    peervault_events_client::start_metrics_reporter(ctx, publisher);
    Ok(())
}

/// Starts the peer service (discovery, probing, PeerService) publishing to `events`.
async fn start_peer(
    ctx: &peervault_runtime::ServiceContext,
    events: Vec<String>,
    self_member: Option<String>,
) -> anyhow::Result<Services> {
    let opts = peervault_peer::PeerOptions {
        events_endpoints: events,
        self_member,
    };
    Ok(peervault_peer::start(ctx, opts).await?.services)
}

/// Subscribes the blob side to the peer service's membership stream, when there is one.
fn start_membership(
    ctx: &peervault_runtime::ServiceContext,
    peer_endpoint: Option<&str>,
) -> anyhow::Result<Option<peervault_membership::MembershipClient>> {
    match peer_endpoint {
        Some(ep) => Ok(Some(peervault_membership::MembershipClient::start(
            ctx,
            ep,
            &ctx.node_id,
        )?)),
        None => {
            tracing::warn!("no --peer-endpoint: this blob node has no membership view (it knows only itself)");
            Ok(None)
        }
    }
}
