//! The directory's settings: command-line flags, the optional config file
//! (`-c /etc/datawire/directory.yaml`) and the defaults, merged by one
//! function, [`resolve`]: a flag beats the file, the file beats the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::limits::{Limits, Network};
use crate::config_file::{self, FileError, Seconds};
use crate::gitsync::RepoUrl;
use crate::logging::LogFlags;
use crate::model::DirectoryAddr;
use crate::tls::ServerTlsFiles;

/// The listen address when neither a flag nor the file gives one: loopback,
/// so a directory reachable from the network is always a choice.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7575";
const DEFAULT_BRANCH: &str = "main";
const DEFAULT_ROUTES_DIR: &str = "routes";
const DEFAULT_POLL: Duration = Duration::from_secs(15);
const DEFAULT_MAX_TTL: Duration = Duration::from_secs(10);
/// Ample for a routes repo; a server that takes longer is treated as down.
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a TCP connect to the git server may take, and the longest
/// it may stay silent on a connection; each at most the fetch timeout.
const GIT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const GIT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Polling faster than this only loads the git server.
const MIN_POLL: Duration = Duration::from_millis(100);

/// Keeps the registry of live service instances and serves snapshots to sherlocks.
#[derive(Debug, Default, clap::Parser)]
#[command(name = "directory", version = crate::build_info::VERSION_LINE, about)]
pub struct Args {
    /// The name this directory reports (dstack's `-n services`) [default: services].
    #[arg(short = 'n', long)]
    pub name: Option<String>,
    /// The address it is known by, e.g. //services/directory; shown in status.
    #[arg(short = 'a', long)]
    pub address: Option<String>,
    /// Where the HTTP API listens; on an address other than loopback every
    /// request needs a token [default: 127.0.0.1:7575].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Where the directory keeps its state (the routes mirror); made 0700,
    /// refused if not this user's alone [default: /var/lib/dstack/directory
    /// as root, else ~/.local/state/dstack/directory-PORT].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The routes repo to follow: a URL git understands (ssh, https, file://)
    /// or a local path. Without it, every live instance gets equal traffic.
    #[arg(long)]
    pub repo: Option<String>,
    /// The branch of the routes repo to follow [default: main].
    #[arg(long)]
    pub branch: Option<String>,
    /// The folder of routes files inside the repo [default: routes].
    #[arg(long)]
    pub routes_dir: Option<String>,
    /// How often to fetch the repo; a webhook (POST /v1/reconcile) fetches
    /// at once [default: 15s].
    #[arg(long, value_parser = config_file::parse_duration)]
    pub poll: Option<Duration>,
    /// The longest one fetch of the routes repo may take, connecting
    /// included; a slower one is given up, reported and retried
    /// [default: 60s].
    #[arg(long, value_parser = config_file::parse_duration)]
    pub fetch_timeout: Option<Duration>,
    /// Accept a branch moved to a commit that does not descend from the one
    /// in force (a force-push that rewinds it); without it such a commit is
    /// rejected.
    #[arg(long)]
    pub allow_rewind: bool,
    /// The largest TTL a heartbeat may ask for; a fresh directory marks its
    /// snapshots `warming` for this long [default: 10s].
    #[arg(long, value_parser = config_file::parse_duration)]
    pub max_ttl: Option<Duration>,
    /// The tokens and their roles (YAML, SHA-256 digests only); reloaded
    /// on SIGHUP. Without it, a directory on a network address makes a
    /// cluster token in STATE_DIR/token.
    #[arg(long)]
    pub auth_file: Option<PathBuf>,
    /// Turns tokens off on a network address: anyone who reaches the port
    /// may register, deregister and read everything.
    #[arg(long)]
    pub insecure: bool,
    /// A file whose secret signs webhooks (GitHub's X-Hub-Signature-256)
    /// to POST /v1/reconcile, instead of an operator token.
    #[arg(long)]
    pub webhook_secret_file: Option<PathBuf>,
    /// A network instance URLs may point into, e.g. 10.0.0.0/8 (repeat for
    /// several). Without it, any address but link-local, multicast and
    /// unspecified ones; those only when a listed network holds them.
    #[arg(long = "allow-network", value_parser = clap::value_parser!(Network))]
    pub allow_networks: Vec<Network>,
    /// The certificate chain (PEM) to serve HTTPS with, instead of HTTP;
    /// needs --tls-key. SIGHUP rereads both.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM, mode 0600).
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Require every client to show a certificate signed by this CA (PEM):
    /// mutual TLS. Needs --tls-cert.
    #[arg(long, value_name = "PEM")]
    pub client_ca: Option<PathBuf>,
    /// A YAML file with any of the settings above (flags win).
    #[arg(short = 'c', long)]
    pub config: Option<PathBuf>,
    /// How and how much it logs.
    #[command(flatten)]
    pub log: LogFlags,
}

/// The config file's form: the flags' names, in snake case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub name: Option<String>,
    pub address: Option<String>,
    pub listen: Option<SocketAddr>,
    pub state_dir: Option<PathBuf>,
    pub repo: Option<String>,
    pub branch: Option<String>,
    pub routes_dir: Option<String>,
    pub poll: Option<Seconds>,
    pub fetch_timeout: Option<Seconds>,
    pub allow_rewind: Option<bool>,
    pub max_ttl: Option<Seconds>,
    pub auth_file: Option<PathBuf>,
    pub insecure: Option<bool>,
    pub webhook_secret_file: Option<PathBuf>,
    pub allow_networks: Option<Vec<Network>>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    /// Bounds on what clients may make the directory hold.
    pub limits: Option<Limits>,
}

/// Where the desired state comes from.
#[derive(Debug, Clone)]
pub struct RepoConfig {
    /// A URL git understands, or a local path; it shows without credentials.
    pub url: RepoUrl,
    /// A valid git branch name.
    pub branch: String,
    /// The folder of routes files inside the repo, without slashes at
    /// either end.
    pub routes_dir: String,
    /// How often to fetch when nothing else asks.
    pub poll: Duration,
    /// The bound on one whole fetch.
    pub fetch_timeout: Duration,
    /// The bound on a TCP connect to the git server (at most `fetch_timeout`).
    pub connect_timeout: Duration,
    /// The longest the git server may stay silent (at most `fetch_timeout`).
    pub read_timeout: Duration,
    /// Whether a branch that moves back (not a descendant of the commit in
    /// force) is accepted.
    pub allow_rewind: bool,
}

/// Who must show a token, decided from `--auth-file`, `--insecure` and
/// whether the listen address is loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// Tokens and roles from this auth file.
    File(PathBuf),
    /// A network address with no auth file: one token, made on first
    /// start in `STATE_DIR/token`, that every client shows.
    ClusterToken,
    /// No tokens: loopback alone (`insecure: false`), or `--insecure`.
    Off { insecure: bool },
}

/// Validated settings of one directory.
#[derive(Debug, Clone)]
pub struct Config {
    /// The name it reports (`-n services`).
    pub name: String,
    /// The address it advertises (`-a //services/directory`), for status only.
    pub address: Option<DirectoryAddr>,
    /// Where the HTTP API listens.
    pub listen: SocketAddr,
    /// Where it keeps its state (the routes mirror).
    pub state_dir: PathBuf,
    /// The routes repo, if desired state comes from git.
    pub repo: Option<RepoConfig>,
    /// The largest TTL a heartbeat may ask for; also how long a fresh
    /// directory marks its snapshots `warming`.
    pub max_ttl: Duration,
    /// Who must show a token.
    pub auth: AuthMode,
    /// The secret that signs webhooks, if any.
    pub webhook_secret_file: Option<PathBuf>,
    /// The networks instance URLs may point into; empty: any ordinary address.
    pub allow_networks: Vec<Network>,
    /// Bounds on the registry, remembered sherlocks and waiting queries.
    pub limits: Limits,
    /// The certificate, key and client CA to serve HTTPS with; None
    /// serves plain HTTP.
    pub tls: Option<ServerTlsFiles>,
}

/// A setting that was refused; the message names the flag or file key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0}")]
    Invalid(String),
}

/// Reads the config file the flags name, if any, and resolves.
pub fn load(args: Args) -> Result<Config, ConfigError> {
    let file = args.config.as_deref().map(config_file::load::<FileConfig>).transpose()?;
    resolve(args, file)
}

/// Merges flags, file and defaults, and checks every value once.
pub fn resolve(args: Args, file: Option<FileConfig>) -> Result<Config, ConfigError> {
    let file = file.unwrap_or_default();
    let invalid = |m: String| ConfigError::Invalid(m);
    let name = args.name.or(file.name).unwrap_or_else(|| "services".to_string());
    if name.is_empty() || name.len() > 128 || name.contains(char::is_control) {
        return Err(invalid(format!("-n/name {name:?}: 1 to 128 printable characters")));
    }
    let address = args
        .address
        .or(file.address)
        .map(|a| a.parse::<DirectoryAddr>().map_err(|e| invalid(format!("-a/address: {e}"))))
        .transpose()?;
    let listen = args.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("a valid default"));
    let state_dir =
        args.state_dir.or(file.state_dir).unwrap_or_else(|| default_state_dir(&StateEnv::current(), listen.port()));
    let poll = args.poll.or(file.poll.map(|s| s.0)).unwrap_or(DEFAULT_POLL);
    if poll < MIN_POLL {
        return Err(invalid(format!("--poll {}: use at least 100ms", humantime::format_duration(poll))));
    }
    let max_ttl = args.max_ttl.or(file.max_ttl.map(|s| s.0)).unwrap_or(DEFAULT_MAX_TTL);
    if max_ttl > Duration::from_secs(3600) {
        return Err(invalid(format!("--max-ttl {}: at most 1h", humantime::format_duration(max_ttl))));
    }
    let branch = args.branch.or(file.branch).unwrap_or_else(|| DEFAULT_BRANCH.to_string());
    if !git2::Reference::is_valid_name(&format!("refs/heads/{branch}")) {
        return Err(invalid(format!("--branch {branch:?}: not a valid git branch name")));
    }
    let routes_dir = args.routes_dir.or(file.routes_dir).unwrap_or_else(|| DEFAULT_ROUTES_DIR.to_string());
    let routes_dir = check_routes_dir(&routes_dir)?;
    let fetch_timeout = args.fetch_timeout.or(file.fetch_timeout.map(|s| s.0)).unwrap_or(DEFAULT_FETCH_TIMEOUT);
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&fetch_timeout) {
        return Err(invalid(format!("--fetch-timeout {}: use 1s to 1h", humantime::format_duration(fetch_timeout))));
    }
    let allow_rewind = args.allow_rewind || file.allow_rewind.unwrap_or(false);
    let repo = match args.repo.or(file.repo) {
        Some(url) if url.is_empty() || url.contains(char::is_control) => {
            return Err(invalid(format!("--repo {}: not a git URL or path", RepoUrl::new(&url))));
        }
        Some(url) => Some(RepoConfig {
            url: RepoUrl::new(&url),
            branch,
            routes_dir,
            poll,
            fetch_timeout,
            connect_timeout: GIT_CONNECT_TIMEOUT.min(fetch_timeout),
            read_timeout: GIT_READ_TIMEOUT.min(fetch_timeout),
            allow_rewind,
        }),
        None => None,
    };
    let insecure = args.insecure || file.insecure.unwrap_or(false);
    let auth = match (args.auth_file.or(file.auth_file), insecure) {
        (Some(path), true) => {
            return Err(invalid(format!(
                "--insecure turns tokens off, but --auth-file {} gives tokens: drop one of them",
                path.display()
            )))
        }
        (Some(path), false) => AuthMode::File(path),
        (None, false) if !listen.ip().is_loopback() => AuthMode::ClusterToken,
        (None, insecure) => AuthMode::Off { insecure },
    };
    let webhook_secret_file = args.webhook_secret_file.or(file.webhook_secret_file);
    let invalid_tls = |m: &str| ConfigError::Invalid(m.to_string());
    let client_ca = args.client_ca.or(file.client_ca);
    let tls = match (args.tls_cert.or(file.tls_cert), args.tls_key.or(file.tls_key)) {
        (Some(cert), Some(key)) => Some(ServerTlsFiles { cert, key, client_ca }),
        (Some(_), None) => {
            return Err(invalid_tls("--tls-cert (tls_cert:) needs --tls-key (tls_key:), its private key"))
        }
        (None, Some(_)) => {
            return Err(invalid_tls("--tls-key (tls_key:) needs --tls-cert (tls_cert:), its certificate"))
        }
        (None, None) if client_ca.is_some() => {
            return Err(invalid_tls(
                "--client-ca (client_ca:) needs --tls-cert and --tls-key: client certificates are checked over TLS",
            ))
        }
        (None, None) => None,
    };
    let allow_networks =
        if args.allow_networks.is_empty() { file.allow_networks.unwrap_or_default() } else { args.allow_networks };
    let limits = file.limits.unwrap_or_default();
    let zero = [
        ("instances", limits.instances),
        ("instances_per_service", limits.instances_per_service),
        ("services", limits.services),
        ("sherlocks", limits.sherlocks),
        ("waiting_queries", limits.waiting_queries),
        ("max_connections", limits.max_connections),
    ];
    if let Some((key, _)) = zero.iter().find(|(_, n)| *n == 0) {
        return Err(invalid(format!("limits.{key}: 0 would refuse everything; give at least 1")));
    }
    let header_read_timeout = limits.header_read_timeout.0;
    if header_read_timeout < Duration::from_millis(100) || header_read_timeout > Duration::from_secs(600) {
        return Err(invalid(format!(
            "limits.header_read_timeout {}: use 100ms to 10m",
            humantime::format_duration(header_read_timeout)
        )));
    }
    Ok(Config {
        name,
        address,
        listen,
        state_dir,
        repo,
        max_ttl,
        auth,
        webhook_secret_file,
        allow_networks,
        limits,
        tls,
    })
}

/// What the default state dir depends on; a parameter so tests give their own.
#[derive(Debug, Clone)]
pub struct StateEnv {
    /// The effective user id: root gets the system's state dir.
    pub uid: u32,
    /// `$XDG_STATE_HOME`, where a user's programs keep state across reboots.
    pub xdg_state_home: Option<PathBuf>,
    /// `$HOME`, for XDG's default `~/.local/state`.
    pub home: Option<PathBuf>,
    /// The shared temp dir, the last resort.
    pub temp_dir: PathBuf,
}

impl StateEnv {
    /// This process's environment.
    pub fn current() -> StateEnv {
        StateEnv {
            // SAFETY: geteuid has no preconditions and cannot fail.
            uid: unsafe { libc::geteuid() },
            xdg_state_home: std::env::var_os("XDG_STATE_HOME").map(PathBuf::from),
            home: std::env::var_os("HOME").map(PathBuf::from),
            temp_dir: std::env::temp_dir(),
        }
    }
}

/// The state dir when none is given: somewhere that survives a reboot and
/// is this user's alone. `/var/lib/dstack/directory` for root
/// (`/var/lib/dstack/directory-PORT` when not on the default port 7575, so
/// two directories on one host stay apart); otherwise
/// `$XDG_STATE_HOME/dstack/directory-PORT`, else
/// `~/.local/state/dstack/directory-PORT`, and only with neither (or with
/// relative paths, which the XDG spec says to ignore) a per-user name in the
/// temp dir. The directory creates it 0700 and refuses it if it is not this
/// user's alone (`private_dir`).
pub fn default_state_dir(env: &StateEnv, port: u16) -> PathBuf {
    if env.uid == 0 {
        return match port {
            crate::model::DEFAULT_DIRECTORY_PORT => PathBuf::from("/var/lib/dstack/directory"),
            p => PathBuf::from(format!("/var/lib/dstack/directory-{p}")),
        };
    }
    let absolute = |p: &Option<PathBuf>| p.clone().filter(|p| p.is_absolute());
    let name = format!("directory-{port}");
    match (absolute(&env.xdg_state_home), absolute(&env.home)) {
        (Some(state), _) => state.join("dstack").join(name),
        (None, Some(home)) => home.join(".local/state/dstack").join(name),
        (None, None) => env.temp_dir.join(format!("dstack-directory-{}-{port}", env.uid)),
    }
}

/// A folder inside the repo: relative, no `..`, no empty segment.
fn check_routes_dir(raw: &str) -> Result<String, ConfigError> {
    let dir = raw.trim_matches('/');
    let ok = !dir.is_empty()
        && !raw.starts_with('/')
        && Path::new(dir).components().all(|c| matches!(c, std::path::Component::Normal(_)))
        && !dir.contains("//");
    if ok {
        Ok(dir.to_string())
    } else {
        Err(ConfigError::Invalid(format!(
            "--routes-dir {raw:?}: expected a folder inside the repo, such as `routes` or `deploy/routes`"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn args(list: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("directory").chain(list.iter().copied())).unwrap()
    }

    fn file(yaml: &str) -> FileConfig {
        config_file::parse(Path::new("directory.yaml"), yaml).unwrap()
    }

    #[test]
    fn defaults() {
        let c = resolve(args(&[]), None).unwrap();
        assert_eq!(c.name, "services");
        assert_eq!(c.listen, "127.0.0.1:7575".parse().unwrap());
        assert_eq!(c.auth, AuthMode::Off { insecure: false }, "loopback alone needs no token (make demo)");
        assert_eq!(c.max_ttl, Duration::from_secs(10));
        assert!(c.repo.is_none());
        assert_eq!(c.state_dir, default_state_dir(&StateEnv::current(), 7575));
        let c = resolve(args(&["--repo", "/srv/routes"]), None).unwrap();
        let repo = c.repo.unwrap();
        assert_eq!((repo.branch.as_str(), repo.routes_dir.as_str(), repo.poll), ("main", "routes", DEFAULT_POLL));
    }

    #[test]
    fn the_default_state_dir_survives_a_reboot() {
        let env = |uid, state: Option<&str>, home: Option<&str>| StateEnv {
            uid,
            xdg_state_home: state.map(PathBuf::from),
            home: home.map(PathBuf::from),
            temp_dir: PathBuf::from("/tmp"),
        };
        let dir = |e: StateEnv, port| default_state_dir(&e, port).display().to_string();
        assert_eq!(dir(env(0, None, Some("/root")), 7575), "/var/lib/dstack/directory");
        assert_eq!(dir(env(0, None, None), 9000), "/var/lib/dstack/directory-9000");
        assert_eq!(dir(env(1000, Some("/s"), Some("/home/u")), 7575), "/s/dstack/directory-7575");
        assert_eq!(dir(env(1000, None, Some("/home/u")), 7575), "/home/u/.local/state/dstack/directory-7575");
        assert_eq!(dir(env(1000, Some("rel"), Some("/home/u")), 7575), "/home/u/.local/state/dstack/directory-7575");
        assert_eq!(dir(env(1000, None, None), 7575), "/tmp/dstack-directory-1000-7575");
    }

    #[test]
    fn a_flag_beats_the_file_and_the_file_beats_the_default() {
        let f = || file("name: east\nlisten: 127.0.0.1:9000\nrepo: /srv/r\nbranch: prod\npoll: 2\nmax_ttl: 30s\n");
        let c = resolve(args(&[]), Some(f())).unwrap();
        assert_eq!(c.name, "east");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.max_ttl, Duration::from_secs(30));
        let repo = c.repo.unwrap();
        assert_eq!((repo.url.expose(), repo.branch.as_str(), repo.poll), ("/srv/r", "prod", Duration::from_secs(2)));
        let c = resolve(
            args(&["-n", "west", "--listen", "127.0.0.1:9100", "--branch", "main", "--poll", "1s", "--max-ttl", "5s"]),
            Some(f()),
        )
        .unwrap();
        assert_eq!(c.name, "west");
        assert_eq!(c.listen.port(), 9100);
        assert_eq!(c.max_ttl, Duration::from_secs(5));
        let repo = c.repo.unwrap();
        assert_eq!((repo.url.expose(), repo.branch.as_str(), repo.poll), ("/srv/r", "main", Duration::from_secs(1)));
    }

    #[test]
    fn a_network_address_needs_tokens_unless_told_otherwise() {
        let auth = |flags: &[&str], yaml: Option<&str>| resolve(args(flags), yaml.map(file)).map(|c| c.auth);
        assert_eq!(auth(&["--listen", "0.0.0.0:7575"], None).unwrap(), AuthMode::ClusterToken);
        assert_eq!(auth(&["--listen", "10.0.0.5:7575"], None).unwrap(), AuthMode::ClusterToken);
        assert_eq!(auth(&["--listen", "[::]:7575"], None).unwrap(), AuthMode::ClusterToken);
        assert_eq!(auth(&["--listen", "127.0.0.2:7575"], None).unwrap(), AuthMode::Off { insecure: false });
        assert_eq!(auth(&["--listen", "[::1]:7575"], None).unwrap(), AuthMode::Off { insecure: false });
        assert_eq!(auth(&["--listen", "0.0.0.0:7575", "--insecure"], None).unwrap(), AuthMode::Off { insecure: true });
        assert_eq!(
            auth(&["--listen", "0.0.0.0:7575"], Some("insecure: true\n")).unwrap(),
            AuthMode::Off { insecure: true }
        );
        // An auth file applies on loopback too; the flag beats the file.
        assert_eq!(auth(&["--auth-file", "/a.yaml"], None).unwrap(), AuthMode::File("/a.yaml".into()));
        assert_eq!(
            auth(&["--auth-file", "/a.yaml"], Some("auth_file: /b.yaml\n")).unwrap(),
            AuthMode::File("/a.yaml".into())
        );
        assert_eq!(auth(&[], Some("auth_file: /b.yaml\n")).unwrap(), AuthMode::File("/b.yaml".into()));
        let err = auth(&["--auth-file", "/a.yaml", "--insecure"], None).unwrap_err().to_string();
        assert!(err.contains("--insecure turns tokens off, but --auth-file /a.yaml gives tokens"), "{err}");
        let c = resolve(args(&["--webhook-secret-file", "/s"]), Some(file("webhook_secret_file: /t\n"))).unwrap();
        assert_eq!(c.webhook_secret_file, Some("/s".into()));
    }

    #[test]
    fn every_bad_value_names_its_flag() {
        let cases: [(&[&str], &str); 6] = [
            (&["--poll", "10ms"], "--poll 10ms: use at least 100ms"),
            (&["--branch", "a..b"], "--branch \"a..b\": not a valid git branch name"),
            (&["--branch", "has space"], "not a valid git branch name"),
            (&["--routes-dir", "../etc"], "--routes-dir \"../etc\": expected a folder inside the repo"),
            (&["--routes-dir", "/abs"], "expected a folder inside the repo"),
            (&["-a", "ftp://x"], "-a/address: invalid directory address"),
        ];
        for (flags, want) in cases {
            let err = resolve(args(flags), None).unwrap_err().to_string();
            assert!(err.contains(want), "{flags:?}: {err}");
        }
        assert!(resolve(args(&["--routes-dir", "deploy/routes/"]), None).is_ok());
    }

    #[test]
    fn tls_and_limits_from_flags_and_the_file() {
        let c = resolve(args(&[]), None).unwrap();
        assert_eq!(c.tls, None, "plain HTTP by default");
        assert_eq!((c.limits.max_connections, c.limits.header_read_timeout.0), (10_000, Duration::from_secs(10)));
        let yaml =
            "tls_cert: /f/cert.pem\ntls_key: /f/key.pem\nlimits:\n  max_connections: 5\n  header_read_timeout: 1s\n";
        let c = resolve(args(&["--tls-cert", "/a/cert.pem", "--client-ca", "/a/ca.pem"]), Some(file(yaml))).unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(
            (tls.cert.to_str(), tls.key.to_str(), tls.client_ca.as_deref().and_then(|p| p.to_str())),
            (Some("/a/cert.pem"), Some("/f/key.pem"), Some("/a/ca.pem")),
            "each flag beats its own key"
        );
        assert_eq!((c.limits.max_connections, c.limits.header_read_timeout.0), (5, Duration::from_secs(1)));
        let cases: [(&[&str], &str, &str); 6] = [
            (&["--tls-cert", "/c"], "", "--tls-cert (tls_cert:) needs --tls-key"),
            (&[], "tls_key: /k\n", "--tls-key (tls_key:) needs --tls-cert"),
            (&["--client-ca", "/ca"], "", "--client-ca (client_ca:) needs --tls-cert and --tls-key"),
            (&[], "limits:\n  max_connections: 0\n", "limits.max_connections: 0 would refuse everything"),
            (&[], "limits:\n  header_read_timeout: 10ms\n", "limits.header_read_timeout 10ms: use 100ms to 10m"),
            (&[], "limits:\n  header_read_timeout: 1h\n", "limits.header_read_timeout 1h: use 100ms to 10m"),
        ];
        for (flags, yaml, want) in cases {
            let err = resolve(args(flags), (!yaml.is_empty()).then(|| file(yaml))).unwrap_err().to_string();
            assert!(err.contains(want), "{flags:?} {yaml:?}: {err}");
        }
        let err = config_file::parse::<FileConfig>(Path::new("d.yaml"), "limits:\n  max_conns: 5\n").unwrap_err();
        assert!(err.to_string().starts_with("d.yaml:2:3: limits: unknown field `max_conns`"), "{err}");
    }

    #[test]
    fn networks_and_limits() {
        let c = resolve(args(&[]), None).unwrap();
        assert!(c.allow_networks.is_empty());
        assert_eq!(c.limits, Limits::default());
        let f = || file("allow_networks: [10.0.0.0/8]\nlimits:\n  instances: 50\n  waiting_queries: 7\n");
        let c = resolve(args(&[]), Some(f())).unwrap();
        assert_eq!(c.allow_networks, vec!["10.0.0.0/8".parse::<Network>().unwrap()]);
        assert_eq!((c.limits.instances, c.limits.waiting_queries), (50, 7));
        assert_eq!(c.limits.sherlocks, Limits::default().sherlocks, "unset keys keep their defaults");
        let c = resolve(args(&["--allow-network", "127.0.0.0/8", "--allow-network", "fd00::/8"]), Some(f())).unwrap();
        assert_eq!(c.allow_networks.len(), 2, "the flags replace the file's list");
        let err = resolve(args(&[]), Some(file("limits: {sherlocks: 0}\n"))).unwrap_err().to_string();
        assert!(err.contains("limits.sherlocks: 0 would refuse everything"), "{err}");
        let err = config_file::parse::<FileConfig>(Path::new("d.yaml"), "limits: {instance: 5}\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `instance`"), "{err}");
        use clap::Parser as _;
        let err = Args::try_parse_from(["directory", "--allow-network", "10.1.2.3/8"]).unwrap_err().to_string();
        assert!(err.contains("expected an address with a prefix length"), "{err}");
    }

    #[test]
    fn fetch_timeout_and_allow_rewind_from_flags_and_the_file() {
        let repo = |flags: &[&str], yaml: Option<&str>| resolve(args(flags), yaml.map(file)).map(|c| c.repo.unwrap());
        let r = repo(&["--repo", "/r"], None).unwrap();
        assert_eq!((r.fetch_timeout, r.allow_rewind), (DEFAULT_FETCH_TIMEOUT, false));
        assert_eq!((r.connect_timeout, r.read_timeout), (GIT_CONNECT_TIMEOUT, GIT_READ_TIMEOUT));
        let r = repo(&[], Some("repo: /r\nfetch_timeout: 5s\nallow_rewind: true\n")).unwrap();
        assert_eq!((r.fetch_timeout, r.allow_rewind), (Duration::from_secs(5), true));
        assert_eq!((r.connect_timeout, r.read_timeout), (Duration::from_secs(5), Duration::from_secs(5)), "capped");
        let r = repo(&["--fetch-timeout", "2m", "--allow-rewind"], Some("repo: /r\nfetch_timeout: 5s\n")).unwrap();
        assert_eq!((r.fetch_timeout, r.allow_rewind), (Duration::from_secs(120), true));
        for bad in ["500ms", "2h"] {
            let err = repo(&["--repo", "/r", "--fetch-timeout", bad], None).unwrap_err().to_string();
            assert!(err.contains(&format!("--fetch-timeout {bad}: use 1s to 1h")), "{err}");
        }
    }

    #[test]
    fn the_file_is_checked_with_its_line_and_column() {
        let err = config_file::parse::<FileConfig>(Path::new("d.yaml"), "name: x\nlisten: nowhere\n").unwrap_err();
        assert!(err.to_string().starts_with("d.yaml:2:9: "), "{err}");
        let err = config_file::parse::<FileConfig>(Path::new("d.yaml"), "nmae: x\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `nmae`"), "{err}");
    }
}
