//! dw, the operator's CLI: see, edit, plan, apply and roll back routes.
//! One file per command, and beside them what commands share: `assign`
//! (route arguments and share math), `edit` (the YAML editor), `converge`
//! (waiting for every sherlock), `output` (stdout). This one holds the
//! command line, the context every command gets, and the exit codes.
//!
//! Exit codes:
//! - 0: success (`plan --detailed-exitcode`: no changes), and a stdout whose
//!   reader went away (`dw route list | head -1`), which ends dw quietly;
//! - 1: an error (directory unreachable, invalid routes or weights, a
//!   refused push, a timeout waiting for convergence);
//! - 2: bad usage (clap's own code), or `plan --detailed-exitcode` found changes.

pub mod apply;
pub mod assign;
pub mod config;
pub mod converge;
pub mod edit;
pub mod output;
pub mod plan;
pub mod route_list;
pub mod route_set;
pub mod status;
pub mod workspace;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::client::ClientFlags;
use crate::client::DirectoryClient;
use crate::model::DirectoryAddr;

/// Successful run.
pub const EXIT_OK: i32 = 0;
/// Something failed while running.
pub const EXIT_ERROR: i32 = 1;
/// Bad usage.
pub const EXIT_USAGE: i32 = 2;

/// dstack's operator CLI: see and move traffic between service versions.
///
/// Routes live in git: `dw route set` edits the working tree, `dw plan` shows
/// the effect, `dw apply` commits, pushes and waits until every sherlock has
/// it, and `dw rollback` reverts.
#[derive(Debug, Parser)]
#[command(name = "dw", version = crate::build_info::VERSION_LINE, about, long_about)]
pub struct Cli {
    /// The directory: http://host:port, host:port, host, or //host/directory
    /// (default port 7575). Default: $DSTACK_DIRECTORY, then `directory:` in
    /// ~/.config/dstack/dw.yaml or /etc/datawire/dw.yaml, then 127.0.0.1:7575.
    #[arg(short = 'd', long = "directory", global = true)]
    pub directory: Option<String>,

    /// The clone of the routes repo to work in [default: the current directory].
    #[arg(long, global = true)]
    pub repo: Option<PathBuf>,

    /// The folder of routes files inside the repo.
    #[arg(long, global = true, default_value = "routes")]
    pub routes_dir: String,

    /// The directory's token and TLS files; dw.yaml's `token_file:`,
    /// `ca_file:`, `client_cert:` and `client_key:` are their defaults.
    #[command(flatten)]
    pub access: ClientFlags,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with routes: list them, or edit the working tree's routes files.
    #[command(subcommand)]
    Route(RouteCommand),
    /// Show what the working tree's routes would change: routes, traffic per
    /// version and instance, and the haproxy.cfg diff.
    Plan {
        /// Exit 0 when there are no changes, 2 when there are, 1 on error.
        #[arg(long)]
        detailed_exitcode: bool,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        /// Save the plan, for `dw apply FILE`.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Commit the working tree's route changes, push them, and wait until the
    /// directory serves them and every sherlock has applied them.
    Apply {
        /// The commit message [default: a summary of the change].
        #[arg(short, long)]
        message: Option<String>,
        /// A plan saved by `dw plan --out`; refused if it is stale.
        planfile: Option<PathBuf>,
        /// How long to wait for every sherlock.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Revert the newest commit that changed routes (or COMMIT), push, and
    /// wait like apply.
    Rollback {
        /// The commit to revert [default: the newest that changed routes].
        commit: Option<String>,
        /// How long to wait for every sherlock.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// The commit served, a rejected commit, instances, and every sherlock's lag.
    Status {
        /// Print the directory's status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set dw's defaults.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Per service and version: desired weight, live instances, effective share.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Set a service's weights in the working tree: `dw route set barker v1=90 v2=10`.
    Set {
        /// The service, `barker` or `//services/barker`.
        service: String,
        /// VERSION=WEIGHT pairs summing to 100.
        #[arg(required = true, value_name = "VERSION=WEIGHT")]
        weights: Vec<String>,
        /// Set this client's own weights (a per-client route) instead.
        #[arg(long)]
        client: Option<String>,
    },
    /// The original dstack form: `dw route add //barker //barker(2) 10%` gives
    /// version 2 10% of barker's traffic, scaling the others; `//monolith` as
    /// SOURCE does it for the client monolith alone.
    Add {
        /// `//barker` (all of the service's clients) or `//monolith` (one client).
        source: String,
        /// `//barker(2)` or `barker(v2)`: the service and version.
        target: String,
        /// The share: `10%` or `10`.
        percent: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// `dw config set directory URL` writes ~/.config/dstack/dw.yaml.
    Set {
        /// The setting: `directory`.
        key: String,
        value: String,
    },
}

/// A failure with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: i32,
    /// What to tell the operator on stderr; empty when there is nothing to say.
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl std::fmt::Display) -> Failure {
        Failure { code: EXIT_USAGE, message: message.to_string() }
    }
    pub fn error(message: impl std::fmt::Display) -> Failure {
        Failure { code: EXIT_ERROR, message: format!("{message:#}") }
    }
    /// Stdout's reader went away (`dw ... | head -1`): nobody reads the
    /// rest, so dw stops, says nothing, and exits 0, as ripgrep does.
    pub fn stdout_closed() -> Failure {
        Failure { code: EXIT_OK, message: String::new() }
    }
    /// Whether dw ends without a word on stderr.
    pub fn is_quiet(&self) -> bool {
        self.message.is_empty()
    }
}

/// Color on a terminal only, and never with NO_COLOR set.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub color: bool,
}

impl Style {
    pub const RED: &'static str = "31";
    pub const GREEN: &'static str = "32";
    pub const YELLOW: &'static str = "33";

    pub fn detect() -> Style {
        Style { color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none() }
    }
    pub fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
    pub fn bold(&self, text: &str) -> String {
        self.paint("1", text)
    }
}

/// What every command gets.
pub struct Context {
    pub client: DirectoryClient,
    pub style: Style,
}

/// Runs one parsed command line; returns the exit code.
pub async fn run(cli: Cli) -> Result<i32, Failure> {
    if let Command::Config(ConfigCommand::Set { key, value }) = &cli.command {
        return config::set(key, value).map(|()| EXIT_OK);
    }
    let raw = match &cli.directory {
        Some(d) => d.clone(),
        None => config::default_directory()?,
    };
    let directory: DirectoryAddr = raw.parse().map_err(|e| Failure::usage(format!("-d: {e}")))?;
    let token = config::token(cli.access.token_file.as_deref())?;
    let tls = config::tls(crate::tls::ClientTlsFiles {
        ca_file: cli.access.ca_file.clone(),
        client_cert: cli.access.client_cert.clone(),
        client_key: cli.access.client_key.clone(),
    })?;
    let client = DirectoryClient::with_tls(directory, Duration::from_secs(10), &tls).with_token(token.as_ref());
    let ctx = Context { client, style: Style::detect() };
    let repo = cli.repo.as_deref();
    let routes_dir = cli.routes_dir.as_str();
    match cli.command {
        Command::Route(RouteCommand::List { json }) => route_list::run(&ctx, json).await.map(|()| EXIT_OK),
        Command::Route(RouteCommand::Set { service, weights, client }) => {
            route_set::set(&ctx, repo, routes_dir, &service, &weights, client.as_deref()).map(|()| EXIT_OK)
        }
        Command::Route(RouteCommand::Add { source, target, percent }) => {
            route_set::add(&ctx, repo, routes_dir, &source, &target, &percent).await.map(|()| EXIT_OK)
        }
        Command::Plan { detailed_exitcode, json, out } => {
            plan::run(&ctx, repo, routes_dir, detailed_exitcode, json, out.as_deref()).await
        }
        Command::Apply { message, planfile, timeout } => {
            apply::apply(&ctx, repo, routes_dir, message.as_deref(), planfile.as_deref(), timeout)
                .await
                .map(|()| EXIT_OK)
        }
        Command::Rollback { commit, timeout } => {
            apply::rollback(&ctx, repo, routes_dir, commit.as_deref(), timeout).await.map(|()| EXIT_OK)
        }
        Command::Status { json } => status::run(&ctx, json).await.map(|()| EXIT_OK),
        Command::Config(_) => unreachable!("handled above"),
    }
}
