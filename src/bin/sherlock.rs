//! `sherlock`: follows the directory and drives a local HAProxy.

use std::process::ExitCode;

use clap::Parser;
use dstack::sherlock::config::{self, Args};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match config::load(Args::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sherlock: {e}");
            return ExitCode::from(2);
        }
    };
    dstack::init_tracing();
    match dstack::sherlock::run(config, dstack::shutdown_on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("sherlock: {e:#}");
            ExitCode::FAILURE
        }
    }
}
