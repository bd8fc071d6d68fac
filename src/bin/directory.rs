//! `directory`: the registry of live instances and the snapshot server.

use std::process::ExitCode;

use clap::Parser;
use dstack::directory::config::{self, Args};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match config::load(Args::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("directory: {e}");
            return ExitCode::from(2);
        }
    };
    dstack::init_tracing();
    match dstack::directory::run(config, dstack::shutdown_on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("directory: {e:#}");
            ExitCode::FAILURE
        }
    }
}
