//! sherlock's settings: command-line flags, `/etc/datawire/sherlock.yaml`
//! (read when no `-d` is given) and the defaults, merged by one function,
//! [`resolve`]: a flag beats the file, the file beats the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::client::ClientFlags;
use crate::config_file::{self, FileError, Seconds};
use crate::logging::LogFlags;
use crate::model::{ClientName, DirectoryAddr, InstanceId};
use crate::secret::{self, Secret, SecretError};
use crate::tls::{ClientTls, ClientTlsFiles, TlsError};

pub const DEFAULT_CONFIG: &str = "/etc/datawire/sherlock.yaml";
const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8000);
const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8001);
const DEFAULT_COALESCE: Duration = Duration::from_millis(50);
/// Coalescing longer than this would hold changes back noticeably.
const MAX_COALESCE: Duration = Duration::from_secs(1);
/// Unix socket paths are limited to 107 bytes; the run dir holds two.
const MAX_SOCKET_PATH: usize = 100;

/// Keeps a local HAProxy routing http://LISTEN/<service>/... to live instances.
///
/// With no -d, reads the config file (-c).
#[derive(Debug, Default, clap::Parser)]
#[command(name = "sherlock", version = crate::build_info::VERSION_LINE, about)]
pub struct Args {
    /// A directory to follow (repeat for failover, in order): http://host:port,
    /// host:port, host or //host/directory.
    #[arg(short = 'd', long = "directory")]
    pub directories: Vec<String>,
    /// Where HAProxy listens for this host's clients [default: 127.0.0.1:8000].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Holds haproxy.cfg, HAProxy's sockets and the last snapshot; made 0700,
    /// refused if not this user's alone [default: /run/dstack/sherlock as
    /// root, else $XDG_RUNTIME_DIR/dstack/sherlock-PORT].
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// The HAProxy binary [default: haproxy on the PATH].
    #[arg(long)]
    pub haproxy: Option<PathBuf>,
    /// A minijinja template that replaces the built-in haproxy.cfg template.
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// The client name whose per-client routes (a route's `clients:` entry)
    /// this sherlock follows [default: the host name].
    #[arg(long)]
    pub client: Option<String>,
    /// The name this sherlock reports to the directory [default: HOST-PORT].
    #[arg(long)]
    pub name: Option<String>,
    /// Where /metrics and /status are served; `off` turns them off
    /// [default: 127.0.0.1:8001].
    #[arg(long)]
    pub admin: Option<String>,
    /// How changes reach HAProxy: `runtime` (servers through the Runtime API,
    /// a seamless reload only for new services or a new template) or
    /// `reload` (a seamless reload for every change) [default: runtime].
    #[arg(long, value_enum)]
    pub apply_mode: Option<ApplyMode>,
    /// Changes closer together than this are applied as one (capped at 1s);
    /// 0s turns it off [default: 50ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub coalesce: Option<Duration>,
    /// The directory's token and TLS files.
    #[command(flatten)]
    pub access: ClientFlags,
    /// The config file read when no -d is given.
    #[arg(short = 'c', long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// How and how much it logs.
    #[command(flatten)]
    pub log: LogFlags,
    /// $DSTACK_TOKEN, read by [`load`].
    #[arg(skip)]
    pub env_token: Option<Secret>,
}

/// How changes reach HAProxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ApplyMode {
    /// Servers through the Runtime API; a seamless reload only when more changed.
    Runtime,
    /// A seamless reload for every change (the baseline benchmarks compare with).
    Reload,
}

/// `/etc/datawire/sherlock.yaml`: the flags' names, in snake case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub directories: Vec<DirectoryAddr>,
    pub listen: Option<SocketAddr>,
    pub run_dir: Option<PathBuf>,
    pub haproxy: Option<PathBuf>,
    pub template: Option<PathBuf>,
    pub client: Option<ClientName>,
    pub name: Option<String>,
    /// An address, or `off`.
    pub admin: Option<String>,
    pub apply_mode: Option<ApplyMode>,
    pub coalesce: Option<Seconds>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Validated settings of one sherlock.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directories to follow, in failover order.
    pub directories: Vec<DirectoryAddr>,
    /// Where HAProxy listens for clients.
    pub listen: SocketAddr,
    /// Holds haproxy.cfg, its sockets and the last applied snapshot.
    pub run_dir: PathBuf,
    /// The HAProxy binary.
    pub haproxy: PathBuf,
    /// A template that replaces the built-in one.
    pub template: Option<PathBuf>,
    /// How this sherlock names itself to the directory (for `dw status`).
    pub name: InstanceId,
    /// The client whose per-client routes this sherlock follows.
    pub client: ClientName,
    /// Where `/metrics` and `/status` are served; None turns them off.
    pub admin: Option<SocketAddr>,
    /// How changes reach HAProxy.
    pub mode: ApplyMode,
    /// Changes closer together than this are applied as one (capped at 1 s).
    pub coalesce: Duration,
    /// Sent to every directory; None when auth is off there.
    pub token: Option<Secret>,
    /// TLS for https:// directories: `--ca-file` alone, or the system's
    /// roots; the client certificate.
    pub tls: ClientTls,
}

/// Why sherlock's settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0}")]
    Invalid(String),
    #[error("token: {0}")]
    Token(#[from] SecretError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Reads the config file when no `-d` is given, and resolves.
pub fn load(mut args: Args) -> Result<Config, ConfigError> {
    args.env_token = secret::token_from_env()?;
    let file = if args.directories.is_empty() {
        let file: FileConfig = config_file::load(&args.config).map_err(|e| match e {
            FileError::Read { path, source } => {
                ConfigError::Invalid(format!("no -d given, and cannot read {}: {source}", path.display()))
            }
            other => other.into(),
        })?;
        if file.directories.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "{}: directories: list at least one directory",
                args.config.display()
            )));
        }
        Some(file)
    } else {
        None
    };
    resolve(args, file, &crate::hostname())
}

/// Merges flags, file and defaults, and checks every value once. `host` is
/// this host's name, for the defaults of `--client` and `--name`.
pub fn resolve(args: Args, file: Option<FileConfig>, host: &str) -> Result<Config, ConfigError> {
    let invalid = ConfigError::Invalid;
    let file = file.unwrap_or_default();
    let directories = if args.directories.is_empty() {
        file.directories
    } else {
        args.directories
            .iter()
            .map(|d| d.parse::<DirectoryAddr>().map_err(|e| invalid(format!("-d: {e}"))))
            .collect::<Result<_, _>>()?
    };
    if directories.is_empty() {
        return Err(invalid("-d: give at least one directory, e.g. -d //services/directory".into()));
    }
    let listen = args.listen.or(file.listen).unwrap_or(DEFAULT_LISTEN);
    let run_dir = args.run_dir.or(file.run_dir).unwrap_or_else(|| default_run_dir(&RunEnv::current(), listen.port()));
    if run_dir.join("master.sock").as_os_str().len() > MAX_SOCKET_PATH {
        return Err(invalid(format!(
            "--run-dir {}: too long for a unix socket path; use a shorter one",
            run_dir.display()
        )));
    }
    let haproxy = args.haproxy.or(file.haproxy).unwrap_or_else(|| PathBuf::from("haproxy"));
    let template = args.template.or(file.template);
    let client = match args.client {
        Some(c) => c.parse::<ClientName>().map_err(|e| invalid(format!("--client: {e}")))?,
        // A host name that is not a valid client name follows the defaults.
        None => file.client.unwrap_or_else(|| host.parse().unwrap_or_else(|_| "default".parse().expect("valid"))),
    };
    let name = args.name.or(file.name).unwrap_or_else(|| format!("{host}-{}", listen.port()));
    let name = name
        .parse::<InstanceId>()
        .map_err(|_| invalid(format!("--name {name:?}: use 1 to 128 of A-Z a-z 0-9 . _ -")))?;
    let admin = match args.admin.or(file.admin).as_deref() {
        Some("off" | "none") => None,
        Some(raw) => Some(
            raw.parse::<SocketAddr>()
                .map_err(|_| invalid(format!("--admin {raw:?}: expected host:port such as 127.0.0.1:8001, or off")))?,
        ),
        None => Some(DEFAULT_ADMIN),
    };
    let mode = args.apply_mode.or(file.apply_mode).unwrap_or(ApplyMode::Runtime);
    let coalesce = args.coalesce.or(file.coalesce.map(|s| s.0)).unwrap_or(DEFAULT_COALESCE);
    if coalesce > MAX_COALESCE {
        return Err(invalid(format!("--coalesce {}: at most 1s", humantime::format_duration(coalesce))));
    }
    let token =
        secret::resolve_token(args.access.token_file.as_deref(), args.env_token.as_ref(), file.token_file.as_deref())?;
    let tls = ClientTls::for_directory(&ClientTlsFiles::resolve(
        args.access.tls_files(),
        ClientTlsFiles { ca_file: file.ca_file, client_cert: file.client_cert, client_key: file.client_key },
    )?)?;
    Ok(Config { directories, listen, run_dir, haproxy, template, name, client, admin, mode, coalesce, token, tls })
}

/// What the default run dir depends on; a parameter so tests give their own.
#[derive(Debug, Clone)]
pub struct RunEnv {
    /// The effective user id: root gets the system's run dir.
    pub uid: u32,
    /// `$XDG_RUNTIME_DIR`: the user's own runtime dir (0700, emptied at logout).
    pub xdg_runtime_dir: Option<PathBuf>,
    /// The shared temp dir, the last resort.
    pub temp_dir: PathBuf,
}

impl RunEnv {
    /// This process's environment.
    pub fn current() -> RunEnv {
        RunEnv {
            // SAFETY: geteuid has no preconditions and cannot fail.
            uid: unsafe { libc::geteuid() },
            xdg_runtime_dir: std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
            temp_dir: std::env::temp_dir(),
        }
    }
}

/// The run dir when none is given, out of the shared temp dir where it can
/// be: `/run/dstack/sherlock` for root (`/run/dstack/sherlock-PORT` when not
/// on the default port 8000, so two sherlocks on one host stay apart),
/// `$XDG_RUNTIME_DIR/dstack/sherlock-PORT` for other users, and only when
/// that is unset (or not absolute, which the XDG spec says to ignore) a
/// per-user name in the temp dir. Whichever it is, sherlock creates it 0700
/// and refuses it if it is not this user's alone (`private_dir`).
pub fn default_run_dir(env: &RunEnv, port: u16) -> PathBuf {
    if env.uid == 0 {
        return match port {
            p if p == DEFAULT_LISTEN.port() => PathBuf::from("/run/dstack/sherlock"),
            p => PathBuf::from(format!("/run/dstack/sherlock-{p}")),
        };
    }
    match env.xdg_runtime_dir.as_deref().filter(|d| d.is_absolute()) {
        Some(xdg) => xdg.join("dstack").join(format!("sherlock-{port}")),
        None => env.temp_dir.join(format!("dstack-sherlock-{}-{port}", env.uid)),
    }
}

/// For tests and callers that build a config file by hand.
pub fn parse_file(path: &Path, yaml: &str) -> Result<FileConfig, FileError> {
    config_file::parse(path, yaml)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn args(list: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("sherlock").chain(list.iter().copied())).unwrap()
    }

    fn file(yaml: &str) -> FileConfig {
        parse_file(Path::new("sherlock.yaml"), yaml).unwrap()
    }

    #[test]
    fn defaults() {
        let c = resolve(args(&["-d", "//services/directory"]), None, "main.example.com").unwrap();
        assert_eq!(c.directories[0].base(), "http://services:7575");
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(c.admin, Some(DEFAULT_ADMIN));
        assert_eq!((c.mode, c.coalesce), (ApplyMode::Runtime, DEFAULT_COALESCE));
        assert_eq!(c.client.as_str(), "main.example.com", "the client defaults to the host name");
        assert_eq!(c.name.as_str(), "main.example.com-8000");
        assert_eq!(c.run_dir, default_run_dir(&RunEnv::current(), 8000));
        let long_host = "h".repeat(100);
        let c = resolve(args(&["-d", "d"]), None, &long_host).unwrap();
        assert_eq!(c.client.as_str(), "default", "a host name that is no client name");
    }

    #[test]
    fn the_default_run_dir_is_out_of_the_shared_temp_dir() {
        let env = |uid, xdg: Option<&str>| RunEnv {
            uid,
            xdg_runtime_dir: xdg.map(PathBuf::from),
            temp_dir: PathBuf::from("/tmp"),
        };
        let run = |e: RunEnv, port| default_run_dir(&e, port).display().to_string();
        assert_eq!(run(env(0, Some("/run/user/0")), 8000), "/run/dstack/sherlock");
        assert_eq!(run(env(0, None), 9000), "/run/dstack/sherlock-9000");
        assert_eq!(run(env(1000, Some("/run/user/1000")), 8000), "/run/user/1000/dstack/sherlock-8000");
        assert_eq!(run(env(1000, None), 8000), "/tmp/dstack-sherlock-1000-8000");
        assert_eq!(run(env(1000, Some("relative")), 8000), "/tmp/dstack-sherlock-1000-8000");
        assert_eq!(run(env(1000, Some("")), 8000), "/tmp/dstack-sherlock-1000-8000");
    }

    #[test]
    fn a_flag_beats_the_file_and_the_file_beats_the_default() {
        let f = || {
            file("directories: [east]\nlisten: 127.0.0.1:9000\nclient: monolith\nadmin: \"off\"\napply_mode: reload\ncoalesce: 200ms\nname: edge-1\n")
        };
        let c = resolve(Args::default(), Some(f()), "h").unwrap();
        assert_eq!(c.directories[0].base(), "http://east:7575");
        assert_eq!((c.listen.port(), c.client.as_str(), c.name.as_str()), (9000, "monolith", "edge-1"));
        assert_eq!((c.admin, c.mode, c.coalesce), (None, ApplyMode::Reload, Duration::from_millis(200)));
        let c = resolve(
            args(&[
                "-d",
                "west",
                "--listen",
                "127.0.0.1:9100",
                "--client",
                "web",
                "--admin",
                "127.0.0.1:9101",
                "--apply-mode",
                "runtime",
                "--coalesce",
                "0s",
                "--name",
                "edge-2",
            ]),
            Some(f()),
            "h",
        )
        .unwrap();
        assert_eq!(c.directories[0].base(), "http://west:7575");
        assert_eq!((c.listen.port(), c.client.as_str(), c.name.as_str()), (9100, "web", "edge-2"));
        assert_eq!(c.admin, Some("127.0.0.1:9101".parse().unwrap()));
        assert_eq!((c.mode, c.coalesce), (ApplyMode::Runtime, Duration::ZERO));
    }

    #[test]
    fn the_token_comes_from_the_flag_then_the_environment_then_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let path = tmp.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
            path
        };
        let (flag, in_file) = (write("flag", "from-flag\n", 0o600), write("file", "from-file\n", 0o400));
        let f = || file(&format!("directories: [d]\ntoken_file: {}\n", in_file.display()));
        let token = |flags: &[&str], env: Option<&str>| {
            let mut a = args(flags);
            a.env_token = env.map(|e| Secret::new(e).unwrap());
            resolve(a, Some(f()), "h").unwrap().token.map(|t| t.expose().to_string())
        };
        let flag_arg = flag.to_str().unwrap();
        assert_eq!(token(&["--token-file", flag_arg], Some("from-env")).as_deref(), Some("from-flag"));
        assert_eq!(token(&[], Some("from-env")).as_deref(), Some("from-env"));
        assert_eq!(token(&[], None).as_deref(), Some("from-file"));
        assert!(resolve(args(&["-d", "d"]), None, "h").unwrap().token.is_none());
        let open = write("open", "t\n", 0o604);
        let err = resolve(args(&["-d", "d", "--token-file", open.to_str().unwrap()]), None, "h").unwrap_err();
        assert!(err.to_string().contains(&format!("token: {} has mode 0604", open.display())), "{err}");
    }

    #[test]
    fn tls_files_come_from_the_flags_then_the_file() {
        // The files do not exist: which one is read shows in the error.
        let f = || file("directories: [\"https://d\"]\nca_file: /file/ca.pem\nclient_key: /file/c.key\n");
        let err = resolve(Args::default(), Some(f()), "h").unwrap_err().to_string();
        assert!(err.contains("--client-key needs --client-cert"), "{err}");
        let err = resolve(args(&["--client-cert", "/c.pem"]), Some(f()), "h").unwrap_err().to_string();
        assert!(err.starts_with("--ca-file /file/ca.pem: cannot read"), "{err}");
        let err = resolve(args(&["--client-cert", "/c.pem", "--ca-file", "/flag/ca.pem"]), Some(f()), "h")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--ca-file /flag/ca.pem: cannot read"), "{err}");
        let c = resolve(args(&["-d", "https://127.0.0.1:9443"]), None, "h").unwrap();
        assert!(c.directories[0].is_tls());
    }

    #[test]
    fn every_bad_value_names_its_flag() {
        let long = format!("/tmp/{}", "x".repeat(120));
        let cases: [(&[&str], &str); 6] = [
            (&["-d", "ftp://x"], "-d: invalid directory address"),
            (&["-d", "d", "--client", "a b"], "--client: invalid client name"),
            (&["-d", "d", "--name", "a/b"], "--name \"a/b\""),
            (&["-d", "d", "--admin", "everywhere"], "--admin \"everywhere\": expected host:port"),
            (&["-d", "d", "--coalesce", "2s"], "--coalesce 2s: at most 1s"),
            (&["-d", "d", "--run-dir", &long], "too long for a unix socket path"),
        ];
        for (flags, want) in cases {
            let err = resolve(args(flags), None, "h").unwrap_err().to_string();
            assert!(err.contains(want), "{flags:?}: {err}");
        }
        let err = resolve(Args::default(), None, "h").unwrap_err().to_string();
        assert!(err.contains("give at least one directory"), "{err}");
    }

    #[test]
    fn the_file_is_checked_with_its_line_and_column() {
        let err = parse_file(Path::new("s.yaml"), "directories: [d]\napply_mode: sometimes\n").unwrap_err();
        assert!(err.to_string().starts_with("s.yaml:2:13: "), "{err}");
        let err = parse_file(Path::new("s.yaml"), "directories: [\"ftp://x\"]\n").unwrap_err();
        assert!(err.to_string().contains("invalid directory address"), "{err}");
    }
}
