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
    /// Where the directory keeps its state.
    #[arg(long)]
    state_dir: Option<PathBuf>,
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
    let config = dstack::directory::Config {
        name: args.name,
        address: args.address,
        listen: args.listen,
        state_dir: args.state_dir,
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
