//! `watson`: checks local instances and heartbeats them to the directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use dstack::model::{DirectoryAddr, InstanceUrl, ServiceName, Version};
use dstack::watson::{config, Config, ServiceConfig};

/// Checks a service instance's liveness and heartbeats it to the directory.
///
/// Seed form: `watson -d //services/directory //services/emitter http://vm101/emitter 3`.
/// With no positional arguments, reads the config file (-c).
#[derive(Debug, Parser)]
#[command(name = "watson", about, disable_version_flag = true)]
struct Args {
    /// A directory to heartbeat to (repeat for several): http://host:port,
    /// host:port, host or //host/directory.
    #[arg(short = 'd', long = "directory")]
    directories: Vec<String>,
    /// The service's name: `emitter` or `//services/emitter`.
    service: Option<String>,
    /// The instance's base URL: http://host[:port][/path].
    url: Option<String>,
    /// Seconds (or a duration such as 500ms) between checks; the TTL is 3x this.
    period: Option<String>,
    /// The version this instance runs (routes give versions their weights) [default: v1].
    #[arg(long, id = "instance_version")]
    version: Option<String>,
    /// The liveness URL; default <URL>/liveness_check. 2xx is alive.
    #[arg(long)]
    check_url: Option<String>,
    /// Passing checks in a row that bring a failed instance back.
    #[arg(long)]
    rise: Option<u32>,
    /// Failing checks in a row that take the instance out.
    #[arg(long)]
    fall: Option<u32>,
    /// How long one check may take (at most the period).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// The config file read when no service is given on the command line.
    #[arg(short = 'c', long, default_value = config::DEFAULT_CONFIG)]
    config: PathBuf,
}

fn settings(args: Args) -> Result<Config, String> {
    let (Some(service), Some(url), Some(period)) = (&args.service, &args.url, &args.period) else {
        if args.service.is_some() {
            return Err("give SERVICE URL PERIOD together, e.g. //services/emitter http://vm101/emitter 3".into());
        }
        return config::load(&args.config).map_err(|e| e.to_string());
    };
    let directories = args
        .directories
        .iter()
        .map(|d| d.parse::<DirectoryAddr>().map_err(|e| format!("-d: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if directories.is_empty() {
        return Err("-d: give at least one directory, e.g. -d //services/directory".into());
    }
    let name: ServiceName = service.parse().map_err(|e| format!("SERVICE: {e}"))?;
    let url: InstanceUrl = url.parse().map_err(|e| format!("URL: {e}"))?;
    let period = config::parse_period(period).map_err(|e| format!("PERIOD: {e}"))?;
    let version =
        args.version.as_deref().map(str::parse::<Version>).transpose().map_err(|e| format!("--version: {e}"))?;
    let service = ServiceConfig::new(name, url, version, args.check_url, period, args.rise, args.fall, args.timeout)?;
    Ok(Config { directories, services: vec![service] })
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = match settings(Args::parse()) {
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
