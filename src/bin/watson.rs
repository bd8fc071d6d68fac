//! `watson`: checks local instances and heartbeats them to the directory.

use std::process::ExitCode;

use clap::Parser;
use dstack::watson::config::{self, Args};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match config::load(Args::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("watson: {e}");
            return ExitCode::from(2);
        }
    };
    dstack::init_tracing();
    match dstack::watson::run(config, dstack::shutdown_on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("watson: {e:#}");
            ExitCode::FAILURE
        }
    }
}
