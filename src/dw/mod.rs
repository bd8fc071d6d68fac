//! dw, the operator's CLI. One file per command; this one holds the
//! command line and the exit codes.
//!
//! Exit codes: 0 success, 1 an error while running (directory unreachable,
//! refused request), 2 bad usage or input (clap's own code for usage errors).

pub mod route_list;

use clap::{Parser, Subcommand};

use crate::model::DirectoryAddr;

/// Successful run.
pub const EXIT_OK: i32 = 0;
/// Something failed while running.
pub const EXIT_ERROR: i32 = 1;
/// Bad usage or input.
pub const EXIT_USAGE: i32 = 2;

/// dstack's operator CLI: see and move traffic between service versions.
#[derive(Debug, Parser)]
#[command(name = "dw", version, about, long_about = None)]
pub struct Cli {
    /// The directory to talk to: http://host:port, host:port, host, or
    /// //host/directory (default port 7575).
    #[arg(short = 'd', long = "directory", global = true, env = "DSTACK_DIRECTORY", default_value = "127.0.0.1:7575")]
    pub directory: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with routes: list what is registered and where traffic goes.
    #[command(subcommand)]
    Route(RouteCommand),
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// List every service, its instances and their share of traffic.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// A failure with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl std::fmt::Display) -> Failure {
        Failure { code: EXIT_USAGE, message: message.to_string() }
    }
    pub fn error(message: impl std::fmt::Display) -> Failure {
        Failure { code: EXIT_ERROR, message: format!("{message:#}") }
    }
}

/// Runs one parsed command line; returns the exit code.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    let directory: DirectoryAddr = cli.directory.parse().map_err(|e| Failure::usage(format!("-d: {e}")))?;
    match cli.command {
        Command::Route(RouteCommand::List { json }) => route_list::run(&directory, json).await,
    }
}
