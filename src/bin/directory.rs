//! `directory`: the registry of live instances and the snapshot server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Keeps the registry of live service instances and serves snapshots to sherlocks.
#[derive(Debug, Parser)]
#[command(name = "directory", version, about)]
struct Args {
    /// The name this directory reports (dstack's `-n services`).
    #[arg(short = 'n', long, default_value = "services")]
    name: String,
    /// The address it is known by, e.g. //services/directory; shown in status.
    #[arg(short = 'a', long)]
    address: Option<String>,
    /// Where the HTTP API listens.
    #[arg(long, default_value = "0.0.0.0:7575")]
    listen: SocketAddr,
    /// Where the directory keeps its state (the routes mirror)
    /// [default: a per-port folder in the temp dir].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The routes repo to follow: a URL git understands (ssh, https, file://)
    /// or a local path. Without it, every live instance gets equal traffic.
    #[arg(long)]
    repo: Option<String>,
    /// The branch of the routes repo to follow.
    #[arg(long, default_value = "main")]
    branch: String,
    /// The folder of routes files inside the repo.
    #[arg(long, default_value = "routes")]
    routes_dir: String,
    /// How often to fetch the repo (a webhook, POST /v1/reconcile, fetches at once).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    poll: Duration,
    /// The largest TTL a heartbeat may ask for (e.g. 10s); a fresh directory
    /// marks its snapshots `warming` for this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    max_ttl: Duration,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    dstack::init_tracing();
    if let Some(addr) = &args.address {
        if let Err(e) = addr.parse::<dstack::model::DirectoryAddr>() {
            eprintln!("directory: -a: {e}");
            return std::process::ExitCode::from(2);
        }
    }
    if args.poll < Duration::from_millis(100) {
        eprintln!("directory: --poll {}: use at least 100ms", humantime::format_duration(args.poll));
        return std::process::ExitCode::from(2);
    }
    if args.branch.is_empty() || args.branch.contains(char::is_whitespace) || args.branch.contains("..") {
        eprintln!("directory: --branch {:?}: not a valid branch name", args.branch);
        return std::process::ExitCode::from(2);
    }
    let repo = args.repo.map(|url| dstack::directory::reconcile::RepoConfig {
        url,
        branch: args.branch,
        routes_dir: args.routes_dir,
        poll: args.poll,
    });
    let state_dir =
        args.state_dir.unwrap_or_else(|| std::env::temp_dir().join(format!("dstack-directory-{}", args.listen.port())));
    let config = dstack::directory::Config {
        name: args.name,
        address: args.address,
        listen: args.listen,
        state_dir,
        repo,
        max_ttl: args.max_ttl,
    };
    match dstack::directory::run(config, dstack::shutdown_on_signals()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("directory: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
