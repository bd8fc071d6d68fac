//! watson's settings: from the seed command line or from
//! `/etc/datawire/watson.yaml` plus one file per service in `services_dir`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::{DirectoryAddr, InstanceUrl, ServiceName, Version};

pub const DEFAULT_CONFIG: &str = "/etc/datawire/watson.yaml";
pub const DEFAULT_SERVICES_DIR: &str = "/etc/datawire.d/";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Yaml { path: PathBuf, line: usize, column: usize, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// One service instance on this host that watson looks after.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: ServiceName,
    pub url: InstanceUrl,
    pub version: Version,
    /// What is fetched to decide liveness; 2xx is alive.
    pub check_url: String,
    /// How often to check and heartbeat; the TTL is three of these.
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
            return Err(format!("check url {check_url:?} is not an http:// URL"));
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
}

/// `/etc/datawire/watson.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    directories: Vec<DirectoryAddr>,
    #[serde(default)]
    services_dir: Option<PathBuf>,
}

/// One file in the services dir.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    #[serde(alias = "service")]
    name: ServiceName,
    url: InstanceUrl,
    #[serde(default)]
    version: Option<Version>,
    #[serde(default)]
    check_url: Option<String>,
    /// Seconds, or a duration such as `500ms`.
    #[serde(default)]
    period: Option<serde_yaml::Value>,
    #[serde(default)]
    rise: Option<u32>,
    #[serde(default)]
    fall: Option<u32>,
}

fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    serde_yaml::from_str(&text).map_err(|e| {
        let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
        ConfigError::Yaml { path: path.into(), line, column, message: e.to_string() }
    })
}

/// Parses a period: a bare number is seconds (as in `watson ... 3`).
pub fn parse_period(raw: &str) -> Result<Duration, String> {
    if let Ok(secs) = raw.parse::<f64>() {
        if secs.is_finite() && secs > 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    humantime::parse_duration(raw)
        .map_err(|_| format!("invalid period {raw:?}: expected seconds (3, 0.5) or a duration (500ms, 2s)"))
}

/// Reads watson.yaml and every `*.yaml` in its services dir.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file: FileConfig = read_yaml(path)?;
    if file.directories.is_empty() {
        return Err(ConfigError::Invalid {
            path: path.into(),
            message: "directories: list at least one directory".into(),
        });
    }
    let dir = file.services_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_SERVICES_DIR));
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|source| ConfigError::Read { path: dir.clone(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    paths.sort();
    let mut services = Vec::new();
    for p in paths {
        let s: ServiceFile = read_yaml(&p)?;
        let invalid = |message: String| ConfigError::Invalid { path: p.clone(), message };
        let period = match &s.period {
            None => Duration::from_secs(3),
            Some(serde_yaml::Value::Number(n)) => parse_period(&n.to_string()).map_err(invalid)?,
            Some(serde_yaml::Value::String(t)) => parse_period(t).map_err(invalid)?,
            Some(other) => return Err(invalid(format!("period: expected seconds or a duration, got {other:?}"))),
        };
        let service =
            ServiceConfig::new(s.name, s.url, s.version, s.check_url, period, s.rise, s.fall, None).map_err(invalid)?;
        services.push(service);
    }
    if services.is_empty() {
        return Err(ConfigError::Invalid {
            path: dir,
            message: "no *.yaml service files here; watson has nothing to watch".into(),
        });
    }
    Ok(Config { directories: file.directories, services })
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
        let config = load(&cfg).unwrap();
        assert_eq!(config.directories[0].base, "http://services:7575");
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
}
