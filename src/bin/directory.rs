//! `directory`: the registry of live instances and the snapshot server.

use std::process::ExitCode;

use clap::Parser;
use dstack::directory::config::{self, Args};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let log = args.log.clone();
    let config = match config::load(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("directory: {e}");
            return ExitCode::from(2);
        }
    };
    dstack::logging::init(&log);
    match dstack::directory::run(config, dstack::shutdown_on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("directory: {e:#}");
            ExitCode::FAILURE
        }
    }
}
