//! `sherlock`: follows the directory and drives a local HAProxy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dstack::model::DirectoryAddr;
use dstack::sherlock::{Config, FileConfig, DEFAULT_CONFIG};

/// Keeps a local HAProxy routing http://LISTEN/<service>/... to live instances.
///
/// With no -d, reads the config file (-c).
#[derive(Debug, Parser)]
#[command(name = "sherlock", version, about)]
struct Args {
    /// A directory to follow (repeat for failover, in order): http://host:port,
    /// host:port, host or //host/directory.
    #[arg(short = 'd', long = "directory")]
    directories: Vec<String>,
    /// Where HAProxy listens for this host's clients [default: 127.0.0.1:8000].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Holds haproxy.cfg, HAProxy's sockets and the last snapshot
    /// [default: a per-port folder in the temp dir].
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// The HAProxy binary [default: haproxy on the PATH].
    #[arg(long)]
    haproxy: Option<PathBuf>,
    /// A minijinja template that replaces the built-in haproxy.cfg template.
    #[arg(long)]
    template: Option<PathBuf>,
    /// The client name whose per-client routes (a route's `clients:` entry)
    /// this sherlock follows [default: the host name].
    #[arg(long)]
    client: Option<String>,
    /// The name this sherlock reports to the directory [default: HOST-PORT].
    #[arg(long)]
    name: Option<String>,
    /// Where /metrics and /status are served; `off` turns them off
    /// [default: 127.0.0.1:8001].
    #[arg(long)]
    admin: Option<String>,
    /// How changes reach HAProxy: `runtime` (servers through the Runtime API,
    /// a seamless reload only for new services or a new template) or
    /// `reload` (a seamless reload for every change).
    #[arg(long, value_enum, default_value = "runtime")]
    apply_mode: dstack::sherlock::ApplyMode,
    /// Changes closer together than this are applied as one (capped at 1s); 0 turns it off.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    coalesce: std::time::Duration,
    /// The config file read when no -d is given.
    #[arg(short = 'c', long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

fn settings(args: Args) -> Result<Config, String> {
    let file = if args.directories.is_empty() {
        let text = std::fs::read_to_string(&args.config)
            .map_err(|e| format!("no -d given, and cannot read {}: {e}", args.config.display()))?;
        let file: FileConfig = serde_yaml::from_str(&text).map_err(|e| {
            let (line, col) = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
            format!("{}:{line}:{col}: {e}", args.config.display())
        })?;
        if file.directories.is_empty() {
            return Err(format!("{}: directories: list at least one directory", args.config.display()));
        }
        Some(file)
    } else {
        None
    };
    let directories = match &file {
        Some(f) => f.directories.clone(),
        None => args
            .directories
            .iter()
            .map(|d| d.parse::<DirectoryAddr>().map_err(|e| format!("-d: {e}")))
            .collect::<Result<_, _>>()?,
    };
    let listen =
        args.listen.or(file.as_ref().and_then(|f| f.listen)).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8000)));
    let run_dir = args
        .run_dir
        .or(file.as_ref().and_then(|f| f.run_dir.clone()))
        .unwrap_or_else(|| std::env::temp_dir().join(format!("dstack-sherlock-{}", listen.port())));
    let haproxy =
        args.haproxy.or(file.as_ref().and_then(|f| f.haproxy.clone())).unwrap_or_else(|| PathBuf::from("haproxy"));
    let template = args.template.or(file.as_ref().and_then(|f| f.template.clone()));
    let client = match args.client {
        Some(c) => c.parse::<dstack::routes::ClientName>().map_err(|e| format!("--client: {e}"))?,
        None => match file.as_ref().and_then(|f| f.client.clone()) {
            Some(c) => c,
            // A host name that is not a valid client name follows the defaults.
            None => dstack::hostname().parse().unwrap_or_else(|_| "default".parse().expect("a valid name")),
        },
    };
    let name = args.name.unwrap_or_else(|| format!("{}-{}", dstack::hostname(), listen.port()));
    name.parse::<dstack::model::InstanceId>()
        .map_err(|_| format!("--name {name:?}: use 1 to 128 of A-Z a-z 0-9 . _ -"))?;
    // Unix socket paths are limited to 107 bytes.
    if run_dir.join("master.sock").as_os_str().len() > 100 {
        return Err(format!("--run-dir {}: too long for a unix socket path; use a shorter one", run_dir.display()));
    }
    let admin = match args.admin.as_deref() {
        Some("off" | "none") => None,
        Some(raw) => Some(
            raw.parse::<SocketAddr>()
                .map_err(|_| format!("--admin {raw:?}: expected host:port such as 127.0.0.1:8001, or off"))?,
        ),
        None => Some(file.as_ref().and_then(|f| f.admin).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8001)))),
    };
    if args.coalesce > std::time::Duration::from_secs(1) {
        return Err("--coalesce: at most 1s".into());
    }
    Ok(Config {
        directories,
        listen,
        run_dir,
        haproxy,
        template,
        name,
        client,
        admin,
        mode: args.apply_mode,
        coalesce: args.coalesce,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = match settings(Args::parse()) {
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
