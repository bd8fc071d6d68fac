//! `watson`: checks local instances and heartbeats them to the directory.

use std::process::ExitCode;

use clap::Parser;
use dstack::watson::config::{self, Args};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.wants_own_version() {
        println!("watson {}", dstack::build_info::VERSION_LINE);
        return ExitCode::SUCCESS;
    }
    let log = args.log.clone();
    let config = match config::load(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("watson: {e}");
            return ExitCode::from(2);
        }
    };
    dstack::logging::init(&log);
    match dstack::watson::run(config, dstack::shutdown_on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("watson: {e:#}");
            ExitCode::FAILURE
        }
    }
}
