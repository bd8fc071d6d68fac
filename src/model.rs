//! The words of the domain: names, versions, instance URLs, directory
//! addresses, and the snapshot the directory serves.
//!
//! Every value that comes from outside (a flag, a YAML file, an HTTP body) is
//! parsed into one of these types before it is used, so nothing unchecked can
//! reach `haproxy.cfg`. Each parse error says what was wrong and what would be
//! accepted.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The directory's default port (from the original dstack).
pub const DEFAULT_DIRECTORY_PORT: u16 = 7575;

/// Why a name, version, URL or address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid service name {0:?}: a name is 1 to 63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter and not ending in '.' (e.g. `emitter`, `barker.internal` or `//services/emitter`)")]
    Service(String),
    #[error("invalid version {0:?}: a version is 1 to 32 characters of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit (e.g. `v1`, `2`, `v2-canary`)")]
    Version(String),
    #[error("invalid instance id {0:?}: an id is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit")]
    InstanceId(String),
    #[error("invalid instance URL {url:?}: {why}; expected http://host[:port][/path]")]
    Url { url: String, why: &'static str },
    #[error(
        "invalid directory address {addr:?}: {why}; expected http://host:port, host:port, host or //host/directory"
    )]
    Directory { addr: String, why: &'static str },
}

fn is_lower_alpha(c: char) -> bool {
    c.is_ascii_lowercase()
}

/// A service's name: `^[a-z][a-z0-9._-]{0,62}$`, not ending in a dot (the
/// original dstack's `barker.internal`). Every character is safe in an
/// HAProxy proxy name, a map key and a URL path.
///
/// Parsing also accepts the dstack form `//services/emitter`, whose last path
/// segment is the name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ServiceName(String);

impl ServiceName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ServiceName {
    type Err = NameError;
    fn from_str(raw: &str) -> Result<Self, NameError> {
        let name = match raw.strip_prefix("//") {
            Some(rest) => rest.rsplit('/').next().unwrap_or(""),
            None => raw,
        };
        let mut chars = name.chars();
        let ok = name.len() <= 63
            && chars.next().is_some_and(is_lower_alpha)
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
            && !name.ends_with('.');
        if ok {
            Ok(ServiceName(name.to_string()))
        } else {
            Err(NameError::Service(raw.to_string()))
        }
    }
}

/// A version label: `^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Version(String);

impl Version {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Version {
    fn default() -> Self {
        Version("v1".to_string())
    }
}

/// True when `s` is 1..=max characters of `[A-Za-z0-9._-]` starting with an
/// alphanumeric: the shape shared by versions and instance ids.
fn is_label(s: &str, max: usize) -> bool {
    let mut chars = s.chars();
    s.len() <= max
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl FromStr for Version {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        if is_label(s, 32) {
            Ok(Version(s.to_string()))
        } else {
            Err(NameError::Version(s.to_string()))
        }
    }
}

/// An instance's id, chosen by its watson. It doubles as the HAProxy server
/// name, so it must be stable for the instance's life and safe in a config.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct InstanceId(String);

impl InstanceId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id watson gives an instance: readable, and stable across watson
    /// restarts because it derives from what the instance is.
    ///
    /// All 64 bits of the hash are kept: with 32, two of 10,000 instances of
    /// one service would share an id about 1% of the time, and flap.
    pub fn derive(service: &ServiceName, version: &Version, url: &InstanceUrl) -> InstanceId {
        let hash = crate::fnv::Fnv::hash(url.to_string().as_bytes());
        InstanceId(format!("{service}-{version}-{hash:016x}"))
    }
}

impl FromStr for InstanceId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        if is_label(s, 128) {
            Ok(InstanceId(s.to_string()))
        } else {
            Err(NameError::InstanceId(s.to_string()))
        }
    }
}

/// An instance's base URL: `http://host[:port][/path]`.
///
/// The host is a DNS name or an IPv4 address; the path is a clean absolute
/// path without query, fragment, spaces or quotes, so it can be placed in an
/// HAProxy rule verbatim.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceUrl {
    /// A DNS name or IPv4 address, lower case.
    host: String,
    port: u16,
    /// The path prefix that replaces `/<service>`; empty for the root.
    path: String,
}

impl InstanceUrl {
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The path prefix that replaces `/<service>`: empty, or `/a/b` with no
    /// trailing slash.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `host:port`, as HAProxy's `server` line wants it.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl fmt::Display for InstanceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            80 => write!(f, "http://{}{}", self.host, self.path),
            port => write!(f, "http://{}:{port}{}", self.host, self.path),
        }
    }
}

/// A DNS name or dotted IPv4 address; nothing that could break a config line.
fn is_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Splits `host[:port]`, refusing a port that is not 1..=65535.
fn split_host_port(s: &str, default_port: u16) -> Result<(String, u16), &'static str> {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => {
            let port: u16 = p.parse().map_err(|_| "the port is not a number in 1..=65535")?;
            if port == 0 {
                return Err("the port is not a number in 1..=65535");
            }
            (h, port)
        }
        None => (s, default_port),
    };
    if !is_host(host) {
        return Err("the host is not a DNS name or IPv4 address");
    }
    Ok((host.to_ascii_lowercase(), port))
}

impl FromStr for InstanceUrl {
    type Err = NameError;
    fn from_str(url: &str) -> Result<Self, NameError> {
        let err = |why| NameError::Url { url: url.to_string(), why };
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            err(if url.contains("://") { "only http:// is supported" } else { "the scheme http:// is missing" })
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (host, port) = split_host_port(authority, 80).map_err(err)?;
        let path = path.trim_end_matches('/');
        let path_ok = path.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.' | '~'))
            && !path.contains("//")
            && !path.split('/').any(|seg| seg == "..");
        if !path_ok {
            return Err(err(
                "the path may hold only letters, digits, '/', '-', '_', '.', '~' (no query, fragment or '..')",
            ));
        }
        if url.len() > 512 {
            return Err(err("it is longer than 512 characters"));
        }
        Ok(InstanceUrl { host, port, path: path.to_string() })
    }
}

impl Serialize for InstanceUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Implements `Deserialize` through `FromStr`, so a bad value in JSON or YAML
/// fails with the same message as on the command line.
macro_rules! deserialize_from_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    )*};
}
deserialize_from_str!(ServiceName, Version, InstanceId);

impl<'de> Deserialize<'de> for InstanceUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a directory listens, normalized to `http://host:port` or
/// `https://host:port`.
///
/// Accepts `http://host:port`, `https://host:port`, `host:port`, `host`,
/// and the dstack form `//host/directory` (the last three are plain http);
/// the default port is 7575.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryAddr {
    /// `http://host:port` or `https://host:port`, no trailing slash.
    base: String,
}

impl DirectoryAddr {
    /// `http(s)://host:port`: requests go to `base() + "/v1/..."`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether it is reached over TLS (`https://`).
    pub fn is_tls(&self) -> bool {
        self.base.starts_with("https://")
    }
}

impl fmt::Display for DirectoryAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

impl FromStr for DirectoryAddr {
    type Err = NameError;
    fn from_str(addr: &str) -> Result<Self, NameError> {
        let err = |why| NameError::Directory { addr: addr.to_string(), why };
        let (scheme, rest) = if let Some(rest) = addr.strip_prefix("http://") {
            ("http", rest.trim_end_matches('/'))
        } else if let Some(rest) = addr.strip_prefix("https://") {
            ("https", rest.trim_end_matches('/'))
        } else if let Some(rest) = addr.strip_prefix("//") {
            // `//host/directory`: the host is the first segment.
            let host = rest.split('/').next().unwrap_or("");
            ("http", host)
        } else if addr.contains("://") {
            return Err(err("the scheme must be http:// or https://"));
        } else {
            ("http", addr.trim_end_matches('/'))
        };
        if rest.contains('/') {
            return Err(err("a path is not allowed after host:port"));
        }
        let (host, port) = split_host_port(rest, DEFAULT_DIRECTORY_PORT).map_err(err)?;
        Ok(DirectoryAddr { base: format!("{scheme}://{host}:{port}") })
    }
}

impl<'de> Deserialize<'de> for DirectoryAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The name a sherlock goes by when it asks for its own routes: `monolith`,
/// or by default its host name (`main.example.com`).
///
/// `^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ClientName(String);

impl ClientName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a client name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid client name {0:?}: a client name is 1 to 63 characters of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit (e.g. `monolith` or a host name)")]
pub struct ClientNameError(pub String);

impl FromStr for ClientName {
    type Err = ClientNameError;
    fn from_str(s: &str) -> Result<Self, ClientNameError> {
        if is_label(s, 63) {
            Ok(ClientName(s.to_string()))
        } else {
            Err(ClientNameError(s.to_string()))
        }
    }
}

impl fmt::Display for ClientName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ClientName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A heartbeat body: `PUT /v1/instances/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub service: ServiceName,
    pub version: Version,
    pub url: InstanceUrl,
    /// How long the directory keeps the instance without another heartbeat.
    pub ttl_ms: u64,
}

/// One server of a service as sherlock must configure it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub id: InstanceId,
    pub url: InstanceUrl,
    pub version: Version,
    /// HAProxy server weight, 0..=256; 0 takes no new traffic.
    pub weight: u32,
}

/// All backends of one service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceBackends {
    /// Sorted by id, so that equal snapshots render equal configs.
    pub backends: Vec<Backend>,
}

/// What the directory serves: the merge of live instances and desired routes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The directory run that made it (its start time in microseconds since
    /// the Unix epoch): a restarted directory counts indexes from 1 again,
    /// so an index alone cannot tell an old snapshot from a new one.
    #[serde(default)]
    pub epoch: u64,
    /// Increases by one every time the content changes within one epoch.
    pub index: u64,
    /// The routes commit this snapshot was built from, if any repo is set.
    pub commit: Option<String>,
    /// True while the directory is younger than one TTL: its registry may
    /// still be filling, so subscribers must not remove backends from it.
    #[serde(default)]
    pub warming: bool,
    pub services: BTreeMap<ServiceName, ServiceBackends>,
    /// Per-client overrides (a route's `clients:` entries): a sherlock whose
    /// client name is listed uses these services in place of the defaults.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub clients: BTreeMap<ClientName, BTreeMap<ServiceName, ServiceBackends>>,
    /// Things an operator should know (a version with no live instance...).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// Which snapshot: (epoch, index), ordered by epoch, then index. Every
/// comparison of snapshots (sherlock's "is this new", `dw apply`'s "has
/// every sherlock applied it") compares both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SnapshotId {
    pub epoch: u64,
    pub index: u64,
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.index, self.epoch)
    }
}

impl Snapshot {
    pub fn id(&self) -> SnapshotId {
        SnapshotId { epoch: self.epoch, index: self.index }
    }

    /// The snapshot as one client sees it: its own overrides in place of the
    /// service defaults, and no other client's.
    pub fn for_client(&self, client: Option<&ClientName>) -> Snapshot {
        let mut view = Snapshot { clients: BTreeMap::new(), ..self.clone() };
        if let Some(overrides) = client.and_then(|c| self.clients.get(c)) {
            for (service, backends) in overrides {
                view.services.insert(service.clone(), backends.clone());
            }
        }
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        assert_eq!("emitter".parse::<ServiceName>().unwrap().as_str(), "emitter");
        assert_eq!("//services/emitter".parse::<ServiceName>().unwrap().as_str(), "emitter");
        assert_eq!("a-b_c9".parse::<ServiceName>().unwrap().as_str(), "a-b_c9");
        // The original dstack's `localhost:8000/barker.internal`.
        assert_eq!("barker.internal".parse::<ServiceName>().unwrap().as_str(), "barker.internal");
        assert_eq!("//barker.internal".parse::<ServiceName>().unwrap().as_str(), "barker.internal");
        for bad in [
            "",
            "Emitter",
            "9lives",
            "-x",
            "a b",
            "a;b",
            "a\nb",
            &"a".repeat(64),
            "//services/",
            "é",
            "barker.",
            ".x",
            "a/b",
        ] {
            let err = bad.parse::<ServiceName>().unwrap_err().to_string();
            assert!(err.contains("starting with a letter"), "{bad:?}: {err}");
        }
        assert!("a".repeat(63).parse::<ServiceName>().is_ok());
    }

    #[test]
    fn client_names() {
        for ok in ["monolith", "main.example.com", "a", "A-1_b", &"x".repeat(63)] {
            assert_eq!(ok.parse::<ClientName>().unwrap().as_str(), ok);
        }
        for bad in ["", "-x", ".x", "a b", "a/b", "é", &"x".repeat(64)] {
            let err = bad.parse::<ClientName>().unwrap_err().to_string();
            assert!(err.contains("starting with a letter or digit"), "{bad:?}: {err}");
        }
        assert!(serde_json::from_str::<ClientName>("\"a b\"").is_err());
    }

    #[test]
    fn versions_and_ids() {
        for ok in ["v1", "2", "v2-canary", "1.2.3", "V_2"] {
            assert!(ok.parse::<Version>().is_ok(), "{ok}");
        }
        for bad in ["", "-v1", ".v", "v 1", "v1;", &"v".repeat(33)] {
            assert!(bad.parse::<Version>().is_err(), "{bad}");
        }
        assert!("emitter-v1-0a1b2c3d".parse::<InstanceId>().is_ok());
        assert!("a/b".parse::<InstanceId>().is_err());
    }

    #[test]
    fn derived_ids_are_stable_and_valid() {
        let s: ServiceName = "emitter".parse().unwrap();
        let v = Version::default();
        let u: InstanceUrl = "http://vm101/emitter".parse().unwrap();
        let id = InstanceId::derive(&s, &v, &u);
        assert_eq!(id, InstanceId::derive(&s, &v, &u));
        assert!(id.as_str().parse::<InstanceId>().is_ok());
        let other: InstanceUrl = "http://vm102/emitter".parse().unwrap();
        assert_ne!(id, InstanceId::derive(&s, &v, &other));
        // The whole 64-bit hash: 16 hex digits.
        assert_eq!(id.as_str(), format!("emitter-v1-{:016x}", crate::fnv::Fnv::hash(b"http://vm101/emitter")));
    }

    #[test]
    fn derived_ids_of_ten_thousand_instances_do_not_collide() {
        // With 32 bits of hash this collided about 1% of the time.
        let s: ServiceName = "emitter".parse().unwrap();
        let v = Version::default();
        let ids: std::collections::HashSet<InstanceId> = (0..10_000u32)
            .map(|n| {
                let url: InstanceUrl =
                    format!("http://10.{}.{}.{}:8080/e", n >> 16, (n >> 8) & 255, n & 255).parse().unwrap();
                InstanceId::derive(&s, &v, &url)
            })
            .collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[test]
    fn instance_urls() {
        let u: InstanceUrl = "http://vm101/emitter".parse().unwrap();
        assert_eq!((u.host(), u.port(), u.path()), ("vm101", 80, "/emitter"));
        let u: InstanceUrl = "http://127.0.0.1:9001/".parse().unwrap();
        assert_eq!((u.port(), u.path()), (9001, ""));
        assert_eq!(u.to_string(), "http://127.0.0.1:9001");
        for bad in [
            "vm101/emitter",
            "https://vm101",
            "http://",
            "http://vm101:0",
            "http://vm101:99999",
            "http://vm 101",
            "http://vm101/a b",
            "http://vm101/a?x=1",
            "http://vm101/a/../b",
            "http://vm101/\"x",
            "http://[::1]:80",
        ] {
            let err = bad.parse::<InstanceUrl>().unwrap_err().to_string();
            assert!(err.contains("expected http://host[:port][/path]"), "{bad}: {err}");
        }
    }

    #[test]
    fn directory_addresses() {
        let cases = [
            ("//services/directory", "http://services:7575"),
            ("services", "http://services:7575"),
            ("services:8080", "http://services:8080"),
            ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
            ("http://127.0.0.1:9000/", "http://127.0.0.1:9000"),
            ("http://Services", "http://services:7575"),
            ("https://services", "https://services:7575"),
            ("https://127.0.0.1:9443/", "https://127.0.0.1:9443"),
        ];
        for (raw, want) in cases {
            let addr = raw.parse::<DirectoryAddr>().unwrap();
            assert_eq!(addr.base(), want, "{raw}");
            assert_eq!(addr.is_tls(), want.starts_with("https://"), "{raw}");
        }
        for bad in ["", "ftp://x", "x:y", "http://x/y", "https://x/y", "https://", "a b"] {
            assert!(bad.parse::<DirectoryAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn heartbeat_rejects_unknown_fields_and_bad_values() {
        let ok = r#"{"service":"emitter","version":"v1","url":"http://vm101/emitter","ttl_ms":9000}"#;
        assert!(serde_json::from_str::<Heartbeat>(ok).is_ok());
        let unknown = r#"{"service":"emitter","version":"v1","url":"http://vm101","ttl_ms":9000,"x":1}"#;
        assert!(serde_json::from_str::<Heartbeat>(unknown).is_err());
        let bad = r#"{"service":"Emitter","version":"v1","url":"http://vm101","ttl_ms":9000}"#;
        let err = serde_json::from_str::<Heartbeat>(bad).unwrap_err().to_string();
        assert!(err.contains("invalid service name"), "{err}");
    }
}
