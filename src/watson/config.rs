//! watson's settings: the seed command line
//! (`watson -d //services/directory //services/emitter http://vm101/emitter 3`)
//! or `/etc/datawire/watson.yaml` plus one file per service in its
//! services dir, merged by [`resolve`]: `-d` flags beat the file's
//! directories, positional arguments replace the file's services.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::client::ClientFlags;
use crate::config_file::{self, FileError, Seconds};
use crate::logging::LogFlags;
use crate::model::{DirectoryAddr, InstanceUrl, ServiceName, Version};
use crate::secret::{self, Secret, SecretError};
use crate::tls::{ClientTls, ClientTlsFiles, TlsError};

pub const DEFAULT_CONFIG: &str = "/etc/datawire/watson.yaml";
pub const DEFAULT_SERVICES_DIR: &str = "/etc/datawire.d/";
const DEFAULT_PERIOD: Duration = Duration::from_secs(3);

/// Checks a service instance's liveness and heartbeats it to the directory.
///
/// Seed form: `watson -d //services/directory //services/emitter http://vm101/emitter 3`.
/// With no positional arguments, reads the config file (-c).
#[derive(Debug, Default, clap::Parser)]
// `--version VERSION` is the instance's version (dstack's seed form), so
// clap's own flag is off; `-V`, or `--version` with no value, prints ours.
#[command(name = "watson", about, version = crate::build_info::VERSION_LINE, disable_version_flag = true)]
pub struct Args {
    /// A directory to heartbeat to (repeat for several): http://host:port,
    /// host:port, host or //host/directory.
    #[arg(short = 'd', long = "directory")]
    pub directories: Vec<String>,
    /// The service's name: `emitter` or `//services/emitter`.
    pub service: Option<String>,
    /// The instance's base URL: http://host[:port][/path].
    pub url: Option<String>,
    /// Seconds (or a duration such as 500ms) between checks and heartbeats;
    /// the TTL is 3x this. A directory whose --max-ttl is shorter gets
    /// heartbeats often enough to fit it (checks keep this period).
    pub period: Option<String>,
    /// The version this instance runs (routes give versions their weights)
    /// [default: v1]; with no value, prints watson's own version, as -V does.
    #[arg(long, id = "instance_version", value_name = "VERSION", num_args = 0..=1)]
    pub version: Option<Option<String>>,
    /// Print watson's version and the git commit it was built from.
    #[arg(short = 'V')]
    pub print_version: bool,
    /// The liveness URL; default <URL>/liveness_check. 2xx is alive.
    #[arg(long)]
    pub check_url: Option<String>,
    /// Passing checks in a row that bring a failed instance back [default: 2].
    #[arg(long)]
    pub rise: Option<u32>,
    /// Failing checks in a row that take the instance out [default: 2].
    #[arg(long)]
    pub fall: Option<u32>,
    /// How long one check may take (at most the period) [default: 2s].
    #[arg(long, value_parser = config_file::parse_duration)]
    pub timeout: Option<Duration>,
    /// The directory's token and TLS files.
    #[command(flatten)]
    pub access: ClientFlags,
    /// Where /metrics is served (host:port, e.g. 127.0.0.1:8002), or off [default: off].
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// The config file read when no service is given on the command line.
    #[arg(short = 'c', long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// How and how much it logs.
    #[command(flatten)]
    pub log: LogFlags,
    /// $DSTACK_TOKEN, read by [`load`].
    #[arg(skip)]
    pub env_token: Option<Secret>,
}

impl Args {
    /// `-V`, or `--version` with no value: print watson's version, not run.
    pub fn wants_own_version(&self) -> bool {
        self.print_version || matches!(self.version, Some(None))
    }
}

/// Why watson's settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Flag(String),
    #[error("token: {0}")]
    Token(#[from] SecretError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// One service instance on this host that watson looks after.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: ServiceName,
    pub url: InstanceUrl,
    pub version: Version,
    /// What is fetched to decide liveness; 2xx is alive.
    pub check_url: String,
    /// How often to check and heartbeat; the TTL is three of these. A
    /// directory that accepts less is heartbeaten faster (see `watson::Pace`).
    pub period: Duration,
    /// Passing checks in a row that bring a failed instance back.
    pub rise: u32,
    /// Failing checks in a row that take an instance out.
    pub fall: u32,
    /// How long one check may take before it counts as failed.
    pub timeout: Duration,
}

impl ServiceConfig {
    /// Applies the defaults and checks the ranges; `where_` names the flag or
    /// file the values came from, for the error.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: ServiceName,
        url: InstanceUrl,
        version: Option<Version>,
        check_url: Option<String>,
        period: Duration,
        rise: Option<u32>,
        fall: Option<u32>,
        timeout: Option<Duration>,
    ) -> Result<ServiceConfig, String> {
        if period < Duration::from_millis(100) || period > Duration::from_secs(3600) {
            return Err(format!("period {} is out of range: 100ms..=1h", humantime::format_duration(period)));
        }
        let check_url = check_url.unwrap_or_else(|| format!("{url}/liveness_check"));
        if !(check_url.starts_with("http://") || check_url.starts_with("https://"))
            || check_url.contains(char::is_whitespace)
        {
            return Err(format!("check url {check_url:?} is not an http:// or https:// URL"));
        }
        let rise = rise.unwrap_or(2);
        let fall = fall.unwrap_or(2);
        if rise == 0 || fall == 0 {
            return Err("rise and fall must be at least 1".into());
        }
        // A check must end before the next one is due.
        let timeout = timeout.unwrap_or(Duration::from_secs(2)).min(period);
        Ok(ServiceConfig { name, url, version: version.unwrap_or_default(), check_url, period, rise, fall, timeout })
    }

    /// The TTL watson asks the directory for.
    pub fn ttl(&self) -> Duration {
        self.period * 3
    }
}

/// Everything one watson does.
#[derive(Debug, Clone)]
pub struct Config {
    pub directories: Vec<DirectoryAddr>,
    pub services: Vec<ServiceConfig>,
    /// Sent to every directory; None when auth is off there.
    pub token: Option<Secret>,
    /// TLS for https:// directories: `--ca-file` alone, or the system's
    /// roots; the client certificate.
    pub tls: ClientTls,
    /// TLS for https:// check URLs: the system's roots and `--ca-file`.
    pub check_tls: ClientTls,
    /// Where `/metrics` is served; None (the default) serves none.
    pub metrics: Option<SocketAddr>,
}

/// `/etc/datawire/watson.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub directories: Vec<DirectoryAddr>,
    #[serde(default)]
    pub services_dir: Option<PathBuf>,
    /// The directory's token, as with --token-file.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// As --ca-file, --client-cert and --client-key.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// As --metrics.
    #[serde(default)]
    pub metrics: Option<String>,
}

/// One file in the services dir.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    #[serde(alias = "service")]
    pub name: ServiceName,
    pub url: InstanceUrl,
    #[serde(default)]
    pub version: Option<Version>,
    #[serde(default)]
    pub check_url: Option<String>,
    /// Seconds, or a duration such as `500ms`.
    #[serde(default)]
    pub period: Option<Seconds>,
    #[serde(default)]
    pub rise: Option<u32>,
    #[serde(default)]
    pub fall: Option<u32>,
}

/// What the config files hold: watson.yaml and its service files, each
/// with the path it was read from (for errors).
#[derive(Debug)]
pub struct Files {
    pub path: PathBuf,
    pub config: FileConfig,
    pub services: Vec<(PathBuf, ServiceFile)>,
}

/// Parses a period: a bare number is seconds (as in `watson ... 3`).
pub fn parse_period(raw: &str) -> Result<Duration, String> {
    config_file::parse_duration(raw)
}

/// Reads the files only when the command line does not name a service.
pub fn load(mut args: Args) -> Result<Config, ConfigError> {
    args.env_token = secret::token_from_env()?;
    let files = if args.service.is_none() { Some(read_files(&args.config)?) } else { None };
    resolve(args, files)
}

/// Reads watson.yaml and every `*.yaml` in its services dir.
pub fn read_files(path: &Path) -> Result<Files, ConfigError> {
    let config: FileConfig = config_file::load(path)?;
    let dir = config.services_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SERVICES_DIR));
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|source| FileError::Read { path: dir.clone(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    paths.sort();
    let mut services = Vec::new();
    for p in paths {
        let service: ServiceFile = config_file::load(&p)?;
        services.push((p, service));
    }
    if services.is_empty() {
        return Err(ConfigError::Invalid {
            path: dir,
            message: "no *.yaml service files here; watson has nothing to watch".into(),
        });
    }
    Ok(Files { path: path.to_path_buf(), config, services })
}

/// Merges the command line and the files, and checks every value once.
pub fn resolve(args: Args, files: Option<Files>) -> Result<Config, ConfigError> {
    let flag = ConfigError::Flag;
    let mut directories = args
        .directories
        .iter()
        .map(|d| d.parse::<DirectoryAddr>().map_err(|e| flag(format!("-d: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    if directories.is_empty() {
        if let Some(files) = &files {
            if files.config.directories.is_empty() {
                return Err(ConfigError::Invalid {
                    path: files.path.clone(),
                    message: "directories: list at least one directory".into(),
                });
            }
            directories = files.config.directories.clone();
        }
    }
    let token_file = files.as_ref().and_then(|f| f.config.token_file.clone());
    let file_metrics = files.as_ref().and_then(|f| f.config.metrics.clone());
    let file_tls = files.as_ref().map_or_else(ClientTlsFiles::default, |f| ClientTlsFiles {
        ca_file: f.config.ca_file.clone(),
        client_cert: f.config.client_cert.clone(),
        client_key: f.config.client_key.clone(),
    });
    let services = match (&args.service, &args.url, &args.period, files) {
        (Some(service), Some(url), Some(period), _) => {
            let name: ServiceName = service.parse().map_err(|e| flag(format!("SERVICE: {e}")))?;
            let url: InstanceUrl = url.parse().map_err(|e| flag(format!("URL: {e}")))?;
            let period = parse_period(period).map_err(|e| flag(format!("PERIOD: {e}")))?;
            let version = args
                .version
                .flatten()
                .as_deref()
                .map(str::parse::<Version>)
                .transpose()
                .map_err(|e| flag(format!("--version: {e}")))?;
            let service =
                ServiceConfig::new(name, url, version, args.check_url, period, args.rise, args.fall, args.timeout)
                    .map_err(flag)?;
            vec![service]
        }
        (Some(_), _, _, _) => {
            return Err(flag("give SERVICE URL PERIOD together, e.g. //services/emitter http://vm101/emitter 3".into()))
        }
        (None, _, _, Some(files)) => files
            .services
            .into_iter()
            .map(|(path, s)| {
                let period = s.period.map_or(DEFAULT_PERIOD, |p| p.0);
                ServiceConfig::new(s.name, s.url, s.version, s.check_url, period, s.rise, s.fall, None)
                    .map_err(|message| ConfigError::Invalid { path, message })
            })
            .collect::<Result<_, _>>()?,
        (None, _, _, None) => return Err(flag("give SERVICE URL PERIOD, or a config file with -c".into())),
    };
    if directories.is_empty() {
        return Err(flag("-d: give at least one directory, e.g. -d //services/directory".into()));
    }
    let token =
        secret::resolve_token(args.access.token_file.as_deref(), args.env_token.as_ref(), token_file.as_deref())?;
    let flag_tls = args.access.tls_files();
    let tls_files = ClientTlsFiles::resolve(flag_tls, file_tls)?;
    let tls = ClientTls::for_directory(&tls_files)?;
    let check_tls = ClientTls::for_checks(tls_files.ca_file.as_deref())?;
    let metrics = match args.metrics.as_deref().or(file_metrics.as_deref()) {
        None | Some("off" | "none") => None,
        Some(raw) => Some(
            raw.parse::<SocketAddr>()
                .map_err(|_| flag(format!("--metrics {raw:?}: expected host:port such as 127.0.0.1:8002, or off")))?,
        ),
    };
    Ok(Config { directories, services, token, tls, check_tls, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods() {
        assert_eq!(parse_period("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_period("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_period("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_period("-1").is_err());
        assert!(parse_period("soon").is_err());
    }

    fn args(list: &[&str]) -> Args {
        use clap::Parser as _;
        Args::try_parse_from(std::iter::once("watson").chain(list.iter().copied())).unwrap()
    }

    #[test]
    fn the_seed_form_and_its_defaults() {
        let c = resolve(args(&["-d", "//services/directory", "//services/emitter", "http://vm101/emitter", "3"]), None)
            .unwrap();
        assert_eq!(c.directories[0].base(), "http://services:7575");
        let s = &c.services[0];
        assert_eq!(
            (s.name.as_str(), s.version.as_str(), s.period, s.rise, s.fall),
            ("emitter", "v1", Duration::from_secs(3), 2, 2)
        );
        assert_eq!(s.timeout, Duration::from_secs(2));
        assert_eq!(s.check_url, "http://vm101/emitter/liveness_check");
        let c = resolve(
            args(&["-d", "d", "e", "http://h", "1", "--version", "v2", "--rise", "3", "--timeout", "5s"]),
            None,
        )
        .unwrap();
        let s = &c.services[0];
        assert_eq!((s.version.as_str(), s.rise), ("v2", 3));
        assert_eq!(s.timeout, Duration::from_secs(1), "a check ends before the next is due");
    }

    #[test]
    fn flags_beat_the_files_directories() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("e.yaml"), "name: emitter\nurl: http://vm101/emitter\n").unwrap();
        let files = || Files {
            path: "watson.yaml".into(),
            config: FileConfig {
                directories: vec!["filedir".parse().unwrap()],
                services_dir: None,
                token_file: None,
                ca_file: None,
                client_cert: None,
                client_key: None,
                metrics: None,
            },
            services: vec![(
                tmp.path().join("e.yaml"),
                config_file::load::<ServiceFile>(&tmp.path().join("e.yaml")).unwrap(),
            )],
        };
        let c = resolve(Args::default(), Some(files())).unwrap();
        assert_eq!(c.directories[0].base(), "http://filedir:7575");
        assert_eq!(c.services[0].period, DEFAULT_PERIOD);
        let c = resolve(args(&["-d", "flagdir"]), Some(files())).unwrap();
        assert_eq!(c.directories[0].base(), "http://flagdir:7575");
    }

    #[test]
    fn the_token_comes_from_the_flag_then_the_environment_then_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = tmp.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            path
        };
        let (flag, file) = (write("flag", "from-flag\n"), write("file", "from-file\n"));
        std::fs::write(tmp.path().join("e.yaml"), "name: emitter\nurl: http://vm101/emitter\n").unwrap();
        let files = || Files {
            path: "watson.yaml".into(),
            config: FileConfig {
                directories: vec!["d".parse().unwrap()],
                services_dir: None,
                token_file: Some(file.clone()),
                ca_file: None,
                client_cert: None,
                client_key: None,
                metrics: None,
            },
            services: vec![(tmp.path().join("e.yaml"), config_file::load(&tmp.path().join("e.yaml")).unwrap())],
        };
        let token = |mut a: Args, env: Option<&str>| {
            a.env_token = env.map(|e| Secret::new(e).unwrap());
            resolve(a, Some(files())).unwrap().token.map(|t| t.expose().to_string())
        };
        let flag_arg = flag.to_str().unwrap();
        assert_eq!(token(args(&["--token-file", flag_arg]), Some("from-env")).as_deref(), Some("from-flag"));
        assert_eq!(token(Args::default(), Some("from-env")).as_deref(), Some("from-env"));
        assert_eq!(token(Args::default(), None).as_deref(), Some("from-file"));
        let open = write("open", "t\n");
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let err = resolve(args(&["--token-file", open.to_str().unwrap()]), Some(files())).unwrap_err().to_string();
        assert!(err.starts_with("token: ") && err.contains("has mode 0644"), "{err}");
    }

    #[test]
    fn tls_files_come_from_the_flags_then_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("e.yaml"), "name: emitter\nurl: http://vm101/emitter\n").unwrap();
        let files = || Files {
            path: "watson.yaml".into(),
            config: FileConfig {
                directories: vec!["https://d".parse().unwrap()],
                services_dir: None,
                token_file: None,
                ca_file: Some("/file/ca.pem".into()),
                client_cert: None,
                client_key: Some("/file/client.key".into()),
                metrics: None,
            },
            services: vec![(tmp.path().join("e.yaml"), config_file::load(&tmp.path().join("e.yaml")).unwrap())],
        };
        // The files do not exist: which one is read shows in the error.
        let err = resolve(Args::default(), Some(files())).unwrap_err().to_string();
        assert!(err.contains("--client-key needs --client-cert"), "{err}");
        let err = resolve(args(&["--client-cert", "/flag/c.pem"]), Some(files())).unwrap_err().to_string();
        assert!(err.starts_with("--ca-file /file/ca.pem: cannot read"), "{err}");
        let err = resolve(args(&["--client-cert", "/c.pem", "--ca-file", "/flag/ca.pem"]), Some(files()))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--ca-file /flag/ca.pem: cannot read"), "{err}");
        let c = resolve(args(&["-d", "https://d", "e", "http://h", "1"]), None).unwrap();
        assert!(c.directories[0].is_tls(), "no TLS flags: the system's roots");
    }

    #[test]
    fn bad_flags_name_themselves() {
        let cases: [(&[&str], &str); 5] = [
            (&["-d", "ftp://x", "e", "http://h", "1"], "-d: invalid directory address"),
            (&["e", "http://h", "1"], "-d: give at least one directory"),
            (&["-d", "d", "E", "http://h", "1"], "SERVICE: invalid service name"),
            (&["-d", "d", "e", "h", "1"], "URL: invalid instance URL"),
            (&["-d", "d", "e", "http://h", "soon"], "PERIOD: invalid duration"),
        ];
        for (flags, want) in cases {
            let err = resolve(args(flags), None).unwrap_err().to_string();
            assert!(err.contains(want), "{flags:?}: {err}");
        }
    }

    #[test]
    fn loads_a_config_dir_and_reports_bad_files() {
        let tmp = tempfile::tempdir().unwrap();
        let services = tmp.path().join("datawire.d");
        std::fs::create_dir(&services).unwrap();
        let cfg = tmp.path().join("watson.yaml");
        std::fs::write(&cfg, format!("directories: [//services/directory]\nservices_dir: {}\n", services.display()))
            .unwrap();
        std::fs::write(
            services.join("emitter.yaml"),
            "name: emitter\nurl: http://vm101/emitter\nperiod: 1\nversion: v2\n",
        )
        .unwrap();
        let load = |cfg: &Path| read_files(cfg).and_then(|files| resolve(Args::default(), Some(files)));
        let config = load(&cfg).unwrap();
        assert_eq!(config.directories[0].base(), "http://services:7575");
        let s = &config.services[0];
        assert_eq!((s.name.as_str(), s.version.as_str(), s.period), ("emitter", "v2", Duration::from_secs(1)));
        assert_eq!(s.check_url, "http://vm101/emitter/liveness_check");
        assert_eq!(s.ttl(), Duration::from_secs(3));

        std::fs::write(
            services.join("emitter.yaml"),
            "name: emitter\nurl: http://vm101/emitter\nperiod: 1\nversion: \"v 2\"\n",
        )
        .unwrap();
        let err = load(&cfg).unwrap_err().to_string();
        assert!(err.contains("emitter.yaml:") && err.contains("invalid version"), "{err}");
    }

    #[test]
    fn metrics_come_from_the_flag_then_the_file_and_are_off_by_default() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("e.yaml"), "name: emitter\nurl: http://vm101/emitter\n").unwrap();
        let files = |metrics: Option<&str>| Files {
            path: "watson.yaml".into(),
            config: FileConfig {
                directories: vec!["d".parse().unwrap()],
                services_dir: None,
                token_file: None,
                ca_file: None,
                client_cert: None,
                client_key: None,
                metrics: metrics.map(String::from),
            },
            services: vec![(tmp.path().join("e.yaml"), config_file::load(&tmp.path().join("e.yaml")).unwrap())],
        };
        let metrics = |flags: &[&str], file: Option<&str>| resolve(args(flags), Some(files(file))).map(|c| c.metrics);
        assert_eq!(metrics(&[], None).unwrap(), None);
        assert_eq!(metrics(&[], Some("127.0.0.1:8002")).unwrap(), Some("127.0.0.1:8002".parse().unwrap()));
        assert_eq!(metrics(&["--metrics", "off"], Some("127.0.0.1:8002")).unwrap(), None);
        assert_eq!(metrics(&["--metrics", "[::1]:9"], None).unwrap(), Some("[::1]:9".parse().unwrap()));
        let err = metrics(&["--metrics", "8002"], None).unwrap_err().to_string();
        assert!(err.contains("--metrics \"8002\": expected host:port such as 127.0.0.1:8002, or off"), "{err}");
    }
}
