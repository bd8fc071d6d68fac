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
    /// HAProxy server weight, 0..=256 ([`MAX_BACKEND_WEIGHT`]); 0 takes no
    /// new traffic.
    pub weight: u32,
}

/// All backends of one service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceBackends {
    /// Sorted by id, so that equal snapshots render equal configs.
    #[serde(deserialize_with = "bounded::backends")]
    pub backends: Vec<Backend>,
}

/// What the directory serves: the merge of live instances and desired routes.
///
/// Decoding one is checked ([`Snapshot::check`]) whatever reads it: a
/// subscriber's blocking query, `snapshot.json` at sherlock's start, `dw`.
/// A snapshot is what sherlock writes into `haproxy.cfg`, so it is trusted no
/// more than any other input (README.md, "Sherlock and HAProxy").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "UncheckedSnapshot")]
pub struct Snapshot {
    /// The directory run that made it (its start time in microseconds since
    /// the Unix epoch): a restarted directory counts indexes from 1 again,
    /// so an index alone cannot tell an old snapshot from a new one.
    pub epoch: u64,
    /// Increases by one every time the content changes within one epoch.
    pub index: u64,
    /// The routes commit this snapshot was built from, if any repo is set:
    /// 7 to 64 lowercase hex digits.
    pub commit: Option<String>,
    /// How many commits that commit's history holds (`git rev-list
    /// --count`): more for every commit the branch moves forward, and the
    /// same on every directory, so a sherlock following several prefers
    /// the one that is not behind. Absent from older directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_count: Option<u64>,
    /// True while the directory is younger than one TTL: its registry may
    /// still be filling, so subscribers must not remove backends from it.
    pub warming: bool,
    pub services: BTreeMap<ServiceName, ServiceBackends>,
    /// Per-client overrides (a route's `clients:` entries): a sherlock whose
    /// client name is listed uses these services in place of the defaults.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub clients: BTreeMap<ClientName, BTreeMap<ServiceName, ServiceBackends>>,
    /// Things an operator should know (a version with no live instance...).
    pub warnings: Vec<String>,
}

/// The largest snapshot body a client reads, and the largest `snapshot.json`
/// sherlock loads: 64 MiB. A snapshot of 10,000 instances is about 1 MiB, so
/// this leaves room for many per-client overrides while bounding what a
/// forged or corrupt body can make a client buffer and decode.
pub const MAX_SNAPSHOT_BYTES: usize = 64 << 20;
/// The most services a snapshot (or one client's overrides) may hold.
pub const MAX_SERVICES: usize = 10_000;
/// The most backends one service may list.
pub const MAX_BACKENDS_PER_SERVICE: usize = 10_000;
/// The most backends a snapshot may list in all, client overrides included:
/// decoded, each costs a few hundred bytes.
pub const MAX_BACKENDS: usize = 200_000;
/// The most clients with overrides a snapshot may hold.
pub const MAX_CLIENTS: usize = 1_000;
/// The most warnings a snapshot may carry.
pub const MAX_WARNINGS: usize = 100_000;
/// The longest warning, in bytes.
pub const MAX_WARNING_BYTES: usize = 4_096;
/// The largest HAProxy server weight (HAProxy's own limit; the same bound as
/// `routes::weights::MAX_SERVER_WEIGHT`, which the model layer cannot import).
pub const MAX_BACKEND_WEIGHT: u32 = 256;
/// Epochs and indexes stay exact in JSON (2^53 - 1): an epoch in
/// microseconds reaches it in the year 2255.
pub const MAX_SNAPSHOT_NUMBER: u64 = (1 << 53) - 1;

/// Why a snapshot was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the snapshot is larger than {limit} bytes, the most a client reads")]
    TooLarge { limit: usize },
    #[error("not a valid snapshot: {0}")]
    Json(#[from] serde_json::Error),
    #[error("epoch {0}: an epoch is 0 to 2^53 - 1 (microseconds since 1970)")]
    Epoch(u64),
    #[error("index {0}: an index is 1 to 2^53 - 1")]
    Index(u64),
    #[error("commit {0}: a commit is 7 to 64 lowercase hex digits")]
    Commit(String),
    #[error("{service}: backend {id} has weight {weight}; a weight is 0 to 256")]
    Weight { service: String, id: InstanceId, weight: u32 },
    #[error("{service}: backend {id} is listed twice")]
    DuplicateBackend { service: String, id: InstanceId },
    #[error("{0} backends in all; a snapshot holds at most {MAX_BACKENDS}")]
    TooManyBackends(usize),
    #[error("warning {index}: {why}")]
    Warning { index: usize, why: String },
}

/// True for a git object id as the directory reports it: 7 to 64 lowercase
/// hex digits (abbreviated, SHA-1 or SHA-256).
pub fn is_commit(s: &str) -> bool {
    (7..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A value quoted for an error message, cut short: a refused value may be
/// megabytes long and hold anything.
fn excerpt(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
        None => format!("{s:?}"),
    }
}

/// The wire form of a [`Snapshot`], before [`Snapshot::check`]. Every list
/// and map is bounded while it is read, so an oversized one fails at its
/// first extra entry instead of after it has been decoded whole.
#[derive(Deserialize)]
struct UncheckedSnapshot {
    /// Absent from directories older than epochs.
    #[serde(default)]
    epoch: u64,
    index: u64,
    commit: Option<String>,
    #[serde(default)]
    commit_count: Option<u64>,
    #[serde(default)]
    warming: bool,
    #[serde(deserialize_with = "bounded::services")]
    services: BTreeMap<ServiceName, ServiceBackends>,
    #[serde(default, deserialize_with = "bounded::clients")]
    clients: BTreeMap<ClientName, BTreeMap<ServiceName, ServiceBackends>>,
    #[serde(default, deserialize_with = "bounded::warnings")]
    warnings: Vec<String>,
}

impl TryFrom<UncheckedSnapshot> for Snapshot {
    type Error = SnapshotError;
    fn try_from(raw: UncheckedSnapshot) -> Result<Snapshot, SnapshotError> {
        let snapshot = Snapshot {
            epoch: raw.epoch,
            index: raw.index,
            commit: raw.commit,
            commit_count: raw.commit_count,
            warming: raw.warming,
            services: raw.services,
            clients: raw.clients,
            warnings: raw.warnings,
        };
        snapshot.check()?;
        Ok(snapshot)
    }
}

/// Deserializers that count entries as they read them.
mod bounded {
    use std::collections::BTreeMap;
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

    use super::*;

    /// A list of at most `max` items.
    struct Seq<T> {
        max: usize,
        what: &'static str,
        item: PhantomData<T>,
    }

    impl<'de, T: Deserialize<'de>> Visitor<'de> for Seq<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a list of at most {} {}", self.max, self.what)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            // The size hint comes from the input: trust it only up to a page.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max).min(1024));
            while let Some(item) = seq.next_element()? {
                if out.len() == self.max {
                    return Err(de::Error::custom(format!("more than {} {}; the most accepted", self.max, self.what)));
                }
                out.push(item);
            }
            Ok(out)
        }
    }

    /// A map of at most `max` entries, none of whose keys appears twice (a
    /// JSON parser that kept the first of two would see another snapshot).
    struct Map<K, V> {
        max: usize,
        what: &'static str,
        entry: PhantomData<(K, V)>,
    }

    impl<'de, K: Deserialize<'de> + Ord + fmt::Display, V: Deserialize<'de>> Visitor<'de> for Map<K, V> {
        type Value = BTreeMap<K, V>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a map of at most {} {}", self.max, self.what)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BTreeMap<K, V>, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((key, value)) = map.next_entry::<K, V>()? {
                if out.len() == self.max {
                    return Err(de::Error::custom(format!("more than {} {}; the most accepted", self.max, self.what)));
                }
                if out.contains_key(&key) {
                    return Err(de::Error::custom(format!("{} {key} is listed twice", self.what)));
                }
                out.insert(key, value);
            }
            Ok(out)
        }
    }

    fn seq<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
        max: usize,
        what: &'static str,
    ) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(Seq { max, what, item: PhantomData })
    }

    fn map<'de, D, K, V>(d: D, max: usize, what: &'static str) -> Result<BTreeMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord + fmt::Display,
        V: Deserialize<'de>,
    {
        d.deserialize_map(Map { max, what, entry: PhantomData })
    }

    pub fn backends<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Backend>, D::Error> {
        seq(d, MAX_BACKENDS_PER_SERVICE, "backends in one service")
    }

    pub fn warnings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        seq(d, MAX_WARNINGS, "warnings")
    }

    pub fn services<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<ServiceName, ServiceBackends>, D::Error> {
        map(d, MAX_SERVICES, "services")
    }

    /// One client's services, bounded like the snapshot's own.
    struct Services(BTreeMap<ServiceName, ServiceBackends>);

    impl<'de> Deserialize<'de> for Services {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Services, D::Error> {
            services(d).map(Services)
        }
    }

    pub fn clients<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<ClientName, BTreeMap<ServiceName, ServiceBackends>>, D::Error> {
        let clients: BTreeMap<ClientName, Services> = map(d, MAX_CLIENTS, "clients")?;
        Ok(clients.into_iter().map(|(name, Services(services))| (name, services)).collect())
    }
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

    /// Decodes a snapshot from JSON, refusing a body over
    /// [`MAX_SNAPSHOT_BYTES`] and any snapshot that fails [`Snapshot::check`].
    pub fn from_json(body: &[u8]) -> Result<Snapshot, SnapshotError> {
        if body.len() > MAX_SNAPSHOT_BYTES {
            return Err(SnapshotError::TooLarge { limit: MAX_SNAPSHOT_BYTES });
        }
        Ok(serde_json::from_slice(body)?)
    }

    /// Every rule a snapshot keeps beyond its typed fields (names, versions,
    /// ids and URLs are checked by their parsers as they are decoded, and
    /// the sizes of lists and maps while they are read): sane numbers, a
    /// commit id, weights HAProxy accepts, no backend listed twice in one
    /// service, a bounded total, and warnings that fit on one line.
    pub fn check(&self) -> Result<(), SnapshotError> {
        if self.epoch > MAX_SNAPSHOT_NUMBER {
            return Err(SnapshotError::Epoch(self.epoch));
        }
        if self.index == 0 || self.index > MAX_SNAPSHOT_NUMBER {
            return Err(SnapshotError::Index(self.index));
        }
        if let Some(commit) = &self.commit {
            if !is_commit(commit) {
                return Err(SnapshotError::Commit(excerpt(commit)));
            }
        }
        let lists =
            self.services.iter().map(|(name, svc)| (name.to_string(), svc)).chain(self.clients.iter().flat_map(
                |(client, services)| services.iter().map(move |(name, svc)| (format!("{name} (client {client})"), svc)),
            ));
        let mut total = 0;
        for (service, svc) in lists {
            total += svc.backends.len();
            if total > MAX_BACKENDS {
                return Err(SnapshotError::TooManyBackends(total));
            }
            let mut seen = std::collections::HashSet::with_capacity(svc.backends.len());
            for b in &svc.backends {
                if b.weight > MAX_BACKEND_WEIGHT {
                    return Err(SnapshotError::Weight { service, id: b.id.clone(), weight: b.weight });
                }
                if !seen.insert(&b.id) {
                    return Err(SnapshotError::DuplicateBackend { service, id: b.id.clone() });
                }
            }
        }
        for (index, warning) in self.warnings.iter().enumerate() {
            let why = if warning.len() > MAX_WARNING_BYTES {
                format!("{} bytes; a warning is at most {MAX_WARNING_BYTES}", warning.len())
            } else if warning.contains(char::is_control) {
                format!("{} holds a control character (a newline, an escape...)", excerpt(warning))
            } else {
                continue;
            };
            return Err(SnapshotError::Warning { index, why });
        }
        Ok(())
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

#[cfg(test)]
mod snapshot_tests {
    use super::*;

    /// A valid snapshot in JSON, with `edit` applied to it first.
    fn json(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v = serde_json::json!({
            "epoch": 1_700_000_000_000_000u64,
            "index": 3,
            "commit": "0123456789abcdef0123456789abcdef01234567",
            "warming": false,
            "services": {"emitter": {"backends": [
                {"id": "emitter-v1-1", "url": "http://10.0.0.1:9001/emitter", "version": "v1", "weight": 256},
                {"id": "emitter-v1-2", "url": "http://vm102/emitter", "version": "v1", "weight": 0}
            ]}},
            "clients": {"monolith": {"emitter": {"backends": []}}},
            "warnings": ["emitter: version v2 has weight 10 but no live instance"]
        });
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    fn refused(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        match Snapshot::from_json(&json(edit)) {
            Ok(s) => panic!("accepted {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_valid_snapshot_decodes_and_round_trips() {
        let s = Snapshot::from_json(&json(|_| {})).unwrap();
        assert_eq!(s.id(), SnapshotId { epoch: 1_700_000_000_000_000, index: 3 });
        assert_eq!(s.services[&"emitter".parse().unwrap()].backends.len(), 2);
        assert_eq!(Snapshot::from_json(&serde_json::to_vec(&s).unwrap()).unwrap(), s);
        // What older directories leave out: epoch, warming, clients, warnings, commit.
        let s = Snapshot::from_json(br#"{"index": 1, "services": {}}"#).unwrap();
        assert_eq!((s.epoch, s.commit, s.warnings.len()), (0, None, 0));
        // Unknown fields are a newer directory's, and are ignored.
        assert!(Snapshot::from_json(&json(|v| v["delta"] = true.into())).is_ok());
    }

    #[test]
    fn the_commit_is_hex() {
        for ok in ["abcdef0", &"f".repeat(64)] {
            assert!(Snapshot::from_json(&json(|v| v["commit"] = ok.into())).is_ok(), "{ok}");
        }
        for bad in ["abcdef", &"a".repeat(65), "ABCDEF0", "abcdefg", "abc1234\nprogram x", "abc1234#", " abc1234", ""] {
            let err = refused(|v| v["commit"] = bad.into());
            assert!(err.contains("a commit is 7 to 64 lowercase hex digits"), "{bad:?}: {err}");
        }
        let err = refused(|v| v["commit"] = "a".repeat(10_000).into());
        assert!(err.contains("(10000 bytes)"), "a long value is cut short in the message: {err}");
        assert!(err.len() < 300, "{err}");
    }

    #[test]
    fn weights_are_0_to_256() {
        let err = refused(|v| v["services"]["emitter"]["backends"][0]["weight"] = 257.into());
        assert!(err.contains("emitter: backend emitter-v1-1 has weight 257; a weight is 0 to 256"), "{err}");
        let err = refused(|v| {
            v["clients"]["monolith"]["emitter"]["backends"] = v["services"]["emitter"]["backends"]
                .clone()
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    let mut b = b.clone();
                    b["weight"] = 300.into();
                    b
                })
                .collect()
        });
        assert!(err.contains("emitter (client monolith): backend emitter-v1-1 has weight 300"), "{err}");
        for bad in
            [serde_json::json!(-1), serde_json::json!(1.5), serde_json::json!("1"), serde_json::json!(1u64 << 33)]
        {
            refused(|v| v["services"]["emitter"]["backends"][0]["weight"] = bad);
        }
    }

    #[test]
    fn names_versions_ids_and_urls_are_parsed() {
        type Edit = fn(&mut serde_json::Value);
        let cases: [(&str, Edit, &str); 6] = [
            ("service", |v| v["services"] = serde_json::json!({"Emitter\n": {"backends": []}}), "invalid service name"),
            ("client", |v| v["clients"] = serde_json::json!({"a b": {}}), "invalid client name"),
            ("id", |v| v["services"]["emitter"]["backends"][0]["id"] = "a#b".into(), "invalid instance id"),
            ("version", |v| v["services"]["emitter"]["backends"][0]["version"] = "v1 x".into(), "invalid version"),
            (
                "url",
                |v| v["services"]["emitter"]["backends"][0]["url"] = "http://h/a\nb".into(),
                "invalid instance URL",
            ),
            ("url scheme", |v| v["services"]["emitter"]["backends"][0]["url"] = "https://h".into(), "only http://"),
        ];
        for (what, edit, want) in cases {
            let err = refused(edit);
            assert!(err.contains(want), "{what}: {err}");
        }
    }

    #[test]
    fn epoch_and_index_are_sane() {
        assert!(refused(|v| v["index"] = 0.into()).contains("index 0: an index is 1 to 2^53 - 1"));
        assert!(refused(|v| v["index"] = (1u64 << 53).into()).contains("an index is 1 to 2^53 - 1"));
        assert!(refused(|v| v["epoch"] = u64::MAX.into()).contains("an epoch is 0 to 2^53 - 1"));
        assert!(refused(|v| v["index"] = (-1).into()).contains("not a valid snapshot"));
        assert!(refused(|v| v["index"] = serde_json::Value::Null).contains("not a valid snapshot"));
    }

    #[test]
    fn counts_are_bounded() {
        let backend =
            |n: usize| serde_json::json!({"id": format!("e-{n}"), "url": "http://h", "version": "v1", "weight": 1});
        let err =
            refused(|v| v["services"]["emitter"]["backends"] = (0..=MAX_BACKENDS_PER_SERVICE).map(backend).collect());
        assert!(err.contains("more than 10000 backends in one service"), "{err}");
        let err = refused(|v| {
            v["services"] = (0..=MAX_SERVICES).map(|n| (format!("s{n}"), serde_json::json!({"backends": []}))).collect()
        });
        assert!(err.contains("more than 10000 services"), "{err}");
        let err =
            refused(|v| v["clients"] = (0..=MAX_CLIENTS).map(|n| (format!("c{n}"), serde_json::json!({}))).collect());
        assert!(err.contains("more than 1000 clients"), "{err}");
        let err = refused(|v| v["warnings"] = vec![""; MAX_WARNINGS + 1].into());
        assert!(err.contains("more than 100000 warnings"), "{err}");
        // 21 services of 10,000 backends each: each list is allowed, the
        // total is not (built in memory: 210,000 in JSON are slow to make).
        let full: Vec<Backend> =
            (0..MAX_BACKENDS_PER_SERVICE).map(|n| serde_json::from_value(backend(n)).unwrap()).collect();
        let mut s = Snapshot { index: 1, ..Snapshot::default() };
        for n in 0..20 {
            s.services.insert(format!("s{n}").parse().unwrap(), ServiceBackends { backends: full.clone() });
        }
        assert!(s.check().is_ok(), "200,000 in all is the limit");
        s.clients.insert("c".parse().unwrap(), [("x".parse().unwrap(), ServiceBackends { backends: full })].into());
        let err = s.check().unwrap_err().to_string();
        assert!(err.contains("210000 backends in all; a snapshot holds at most 200000"), "{err}");
    }

    #[test]
    fn a_backend_or_a_key_listed_twice_is_refused() {
        let err = refused(|v| {
            let b = v["services"]["emitter"]["backends"][0].clone();
            v["services"]["emitter"]["backends"].as_array_mut().unwrap().push(b);
        });
        assert!(err.contains("emitter: backend emitter-v1-1 is listed twice"), "{err}");
        let twice = br#"{"index": 1, "services": {"a": {"backends": []}, "a": {"backends": []}}}"#;
        let err = Snapshot::from_json(twice).unwrap_err().to_string();
        assert!(err.contains("services a is listed twice"), "{err}");
    }

    #[test]
    fn warnings_are_one_bounded_line() {
        let err = refused(|v| v["warnings"] = serde_json::json!(["ok", "a\nb"]));
        assert!(err.contains("warning 1: \"a\\nb\" holds a control character"), "{err}");
        let err = refused(|v| v["warnings"] = serde_json::json!(["\u{1b}[2J"]));
        assert!(err.contains("control character"), "{err}");
        let err = refused(|v| v["warnings"] = serde_json::json!(["x".repeat(MAX_WARNING_BYTES + 1)]));
        assert!(err.contains("4097 bytes; a warning is at most 4096"), "{err}");
        assert!(Snapshot::from_json(&json(|v| v["warnings"] = serde_json::json!(["é ünïcode # \"quoted\""]))).is_ok());
    }

    #[test]
    fn the_body_is_size_bounded() {
        let big = vec![b' '; MAX_SNAPSHOT_BYTES + 1];
        let err = Snapshot::from_json(&big).unwrap_err().to_string();
        assert!(err.contains("larger than 67108864 bytes"), "{err}");
        for junk in [&b""[..], b"null", b"[]", b"{", b"\xff\xfe", b"{\"index\": 1}"] {
            assert!(Snapshot::from_json(junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn every_decode_path_is_checked() {
        // serde_json::from_str (reqwest's .json(), any caller) goes through the same checks.
        let bad = String::from_utf8(json(|v| v["commit"] = "abc1234\nprogram x".into())).unwrap();
        let err = serde_json::from_str::<Snapshot>(&bad).unwrap_err().to_string();
        assert!(err.contains("a commit is 7 to 64 lowercase hex digits"), "{err}");
    }

    #[test]
    fn the_weight_bound_is_the_routes_one() {
        assert_eq!(MAX_BACKEND_WEIGHT, crate::routes::weights::MAX_SERVER_WEIGHT);
    }
}
