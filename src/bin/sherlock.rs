//! `sherlock`: follows the directory and drives a local HAProxy.

use std::process::ExitCode;

use clap::Parser;
use dstack::sherlock::config::{self, Args};

fn main() -> ExitCode {
    let args = Args::parse();
    let log = args.log.clone();
    let config = match config::load(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sherlock: {e}");
            return ExitCode::from(2);
        }
    };
    // Before any thread: as a container's PID 1 it forks a reaper first.
    dstack::sherlock::pid1::fork_if_pid1();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sherlock: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        dstack::logging::init(&log);
        match dstack::sherlock::run(config, dstack::shutdown_on_signals()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("sherlock: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
