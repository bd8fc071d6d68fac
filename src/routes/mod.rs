//! Routes: the desired traffic split, read from YAML files in the routes repo.
//!
//! A routes file maps each service to the share of traffic every version of
//! it should get (README.md, "Routes in git"):
//!
//! ```yaml
//! barker:            # short form: version -> weight
//!   v1: 90
//!   v2: 10
//! transform:         # long form: weights plus per-client overrides
//!   weights: {v1: 100}
//!   clients:
//!     monolith: {v1: 50, v2: 50}
//! ```
//!
//! [`parse_files`] validates a whole commit at once and returns every error
//! with its `file:line:column`, so one push shows the operator everything to
//! fix. [`weights`] turns a validated route and the live instances into
//! HAProxy server weights. `schema/routes.schema.json` states the same rules
//! for editors; the code is the authority (it also checks the sums).

mod parse;
pub mod weights;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::{ClientName, ServiceName, Version};

pub use parse::parse_files;
pub use weights::{effective_shares, realized_shares, server_weights, Assignment};

/// What every weight map must sum to: weights are percentages.
pub const WEIGHT_TOTAL: u32 = 100;

/// A version -> weight map that meets the rules: not empty, each weight in
/// 0..=100, summing to exactly 100.
///
/// The map is private: a `Weights` is built only by [`Weights::new`] (or
/// by deserializing, which calls it), so every one meets the rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Weights(BTreeMap<Version, u32>);

/// Why a weight map was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightsError {
    #[error("no weights: list at least one version with its weight, e.g. `v1: 100`")]
    Empty,
    #[error("weight {weight} for {version} is out of range: a weight is a whole number from 0 to 100")]
    OutOfRange { version: Version, weight: u32 },
    #[error("weights sum to {0}, they must sum to 100")]
    Sum(u32),
}

impl Weights {
    /// Checks the rules; the error says which one failed.
    pub fn new(map: BTreeMap<Version, u32>) -> Result<Weights, WeightsError> {
        if map.is_empty() {
            return Err(WeightsError::Empty);
        }
        if let Some((version, &weight)) = map.iter().find(|(_, w)| **w > WEIGHT_TOTAL) {
            return Err(WeightsError::OutOfRange { version: version.clone(), weight });
        }
        // Each weight is at most 100, so the sum cannot overflow.
        let sum: u32 = map.values().sum();
        if sum != WEIGHT_TOTAL {
            return Err(WeightsError::Sum(sum));
        }
        Ok(Weights(map))
    }

    /// The weight of `version`; 0 when it is not listed (a staged version).
    pub fn get(&self, version: &Version) -> u32 {
        self.0.get(version).copied().unwrap_or(0)
    }

    /// Every listed version with its weight, in version order.
    pub fn iter(&self) -> impl Iterator<Item = (&Version, u32)> {
        self.0.iter().map(|(v, w)| (v, *w))
    }

    pub fn as_map(&self) -> &BTreeMap<Version, u32> {
        &self.0
    }
}

/// `v1=90 v2=10`, for any version -> weight map, valid or not (an error
/// message shows what the operator gave).
pub fn weights_text(map: &BTreeMap<Version, u32>) -> String {
    map.iter().map(|(version, weight)| format!("{version}={weight}")).collect::<Vec<_>>().join(" ")
}

/// `v1=90 v2=10`: the form `dw route set` takes.
impl fmt::Display for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&weights_text(&self.0))
    }
}

impl<'de> Deserialize<'de> for Weights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Weights::new(BTreeMap::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// The desired split of one service's traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The split every client follows unless it has its own entry.
    pub weights: Weights,
    /// Per-client overrides: a sherlock with one of these names follows its
    /// own split instead (e.g. move one consumer to a new version first).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub clients: BTreeMap<ClientName, Weights>,
}

/// Every route of one commit of the routes repo.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSet {
    /// One route per service; a service without an entry splits its traffic
    /// equally across its live instances.
    pub routes: BTreeMap<ServiceName, Route>,
}

impl RouteSet {
    /// The weights a given client should follow for a service: its own entry
    /// if any, else the service's. `None` when the service has no route.
    pub fn weights_for(&self, service: &ServiceName, client: Option<&ClientName>) -> Option<&Weights> {
        let route = self.routes.get(service)?;
        Some(client.and_then(|c| route.clients.get(c)).unwrap_or(&route.weights))
    }
}

/// One thing wrong with a routes file, located for an editor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct RouteError {
    /// Path relative to the repo root (`routes/barker.yaml`), as in git.
    pub file: String,
    /// 1-based line of the offending key or value.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong and what would be accepted.
    pub message: String,
}

impl RouteError {
    /// An error about a whole file (unreadable, not UTF-8): line 1, column 1.
    pub fn at_start(file: impl Into<String>, message: impl Into<String>) -> RouteError {
        RouteError { file: file.into(), line: 1, column: 1, message: message.into() }
    }
}

/// A routes file as found in a commit or a working tree, not yet checked:
/// its path from the repo root (`routes/barker.yaml`) and its content.
pub type RawFile = (String, Content);

/// What a reader found in a routes file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Bytes(Vec<u8>),
    /// Larger than [`MAX_FILE_BYTES`]: its size, and its bytes left unread,
    /// so a hostile commit cannot make the directory load a huge blob.
    TooLarge(u64),
}

/// At most this many routes files in one commit.
pub const MAX_FILES: usize = 1_000;
/// At most this many bytes in one routes file (1,000 services in the short
/// form take about 30 KB).
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// A rejected commit keeps its first this many errors, and a count of the rest.
pub const MAX_ERRORS: usize = 100;

/// The content of a file of `size` bytes, read by `read` only when it is
/// within [`MAX_FILE_BYTES`]: the git reader and the working-tree reader
/// share this rule.
pub fn read_bounded<E>(size: u64, read: impl FnOnce() -> Result<Vec<u8>, E>) -> Result<Content, E> {
    if size > MAX_FILE_BYTES {
        Ok(Content::TooLarge(size))
    } else {
        read().map(Content::Bytes)
    }
}

/// Whether a file in the routes folder holds routes: `*.yaml` and `*.yml`
/// (a README beside them is not read). The directory's git reader and the
/// working-tree reader both ask this.
pub fn is_routes_file(name: &str) -> bool {
    name.ends_with(".yaml") || name.ends_with(".yml")
}

/// The text of each file, or an error at line 1, column 1 of every file
/// that is not UTF-8 (refused, never decoded lossily: the directory and
/// `dw plan` must agree on every commit).
pub fn decode(files: Vec<RawFile>) -> (Vec<(String, String)>, Vec<RouteError>) {
    let mut texts = Vec::new();
    let mut errors = Vec::new();
    if files.len() > MAX_FILES {
        let dir = files[0].0.rsplit_once('/').map_or("", |(dir, _)| dir).to_string();
        let message = format!("{} routes files; a commit may hold at most {MAX_FILES}", files.len());
        return (texts, vec![RouteError::at_start(dir, message)]);
    }
    for (file, content) in files {
        match content {
            Content::TooLarge(size) => errors.push(RouteError::at_start(
                file,
                format!("the file is {size} bytes; a routes file may be at most {MAX_FILE_BYTES} bytes"),
            )),
            Content::Bytes(bytes) => match String::from_utf8(bytes) {
                Ok(text) => texts.push((file, text)),
                Err(_) => {
                    errors.push(RouteError::at_start(file, "the file is not UTF-8 text; routes files are UTF-8 YAML"))
                }
            },
        }
    }
    (texts, errors)
}

/// The one way routes files become a [`RouteSet`]: the UTF-8 check, then
/// [`parse_files`]. Every error of the commit is returned, in file order.
pub fn read_files(files: Vec<RawFile>) -> Result<RouteSet, Vec<RouteError>> {
    let (texts, mut errors) = decode(files);
    match parse_files(texts.iter().map(|(file, text)| (file.as_str(), text.as_str()))) {
        Ok(set) if errors.is_empty() => Ok(set),
        Ok(_) => Err(errors),
        Err(more) => {
            errors.extend(more);
            Err(errors)
        }
    }
}

/// The routes files directly under `root/routes_dir`, in name order, as
/// bytes. A missing folder has no files (a repo may have no routes yet).
///
/// Paths are `routes_dir/name.yaml`; an IO error becomes a [`RouteError`]
/// at line 1, column 1 of the file (or folder) it concerns.
pub fn read_dir(root: &Path, routes_dir: &str) -> Result<Vec<RawFile>, Vec<RouteError>> {
    let prefix = routes_dir.trim_matches('/');
    let rel = |name: &str| match prefix {
        "" | "." => name.to_string(),
        _ => format!("{prefix}/{name}"),
    };
    let io_error =
        |file: String, what: &str, e: std::io::Error| RouteError::at_start(file, format!("cannot {what}: {e}"));
    let dir = root.join(prefix);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(vec![io_error(prefix.to_string(), "read the routes directory", e)]),
    };

    let mut errors = Vec::new();
    let mut names = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                errors.push(io_error(prefix.to_string(), "read the routes directory", e));
                continue;
            }
        };
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            // Refused rather than skipped: a routes file nobody can name
            // must not be silently left out of the commit.
            let lossy = entry.file_name().to_string_lossy().to_string();
            errors.push(RouteError::at_start(rel(&lossy), "the file name is not UTF-8; rename it"));
            continue;
        };
        // `metadata` follows symlinks, so a linked file counts like a file.
        let is_file = std::fs::metadata(entry.path()).map(|m| m.is_file()).unwrap_or(false);
        if is_file && is_routes_file(&name) {
            names.push(name);
        }
    }
    names.sort();

    let mut files = Vec::new();
    for name in names {
        let path = dir.join(&name);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match read_bounded(size, || std::fs::read(&path)) {
            Ok(content) => files.push((rel(&name), content)),
            Err(e) => errors.push(io_error(rel(&name), "read the file", e)),
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(errors)
    }
}

/// Reads and validates the routes of a working tree: [`read_dir`], then
/// [`read_files`].
pub fn load_dir(root: &Path, routes_dir: &str) -> Result<RouteSet, Vec<RouteError>> {
    read_files(read_dir(root, routes_dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn weights(pairs: &[(&str, u32)]) -> Weights {
        Weights::new(pairs.iter().map(|(k, w)| (v(k), *w)).collect()).unwrap()
    }

    #[test]
    fn weights_rules() {
        let map = |pairs: &[(&str, u32)]| pairs.iter().map(|(k, w)| (v(k), *w)).collect::<BTreeMap<_, _>>();
        assert_eq!(Weights::new(map(&[])), Err(WeightsError::Empty));
        assert_eq!(Weights::new(map(&[("v1", 90), ("v2", 30)])), Err(WeightsError::Sum(120)));
        assert_eq!(
            Weights::new(map(&[("v1", 101)])).unwrap_err().to_string(),
            "weight 101 for v1 is out of range: a weight is a whole number from 0 to 100"
        );
        let w = weights(&[("v1", 90), ("v2", 10), ("v3", 0)]);
        assert_eq!((w.get(&v("v2")), w.get(&v("v9"))), (10, 0));
        assert_eq!(w.to_string(), "v1=90 v2=10 v3=0");
    }

    #[test]
    fn serde_round_trip_validates() {
        let mut set = RouteSet::default();
        let mut clients = BTreeMap::new();
        clients.insert("monolith".parse().unwrap(), weights(&[("v1", 70), ("v2", 30)]));
        set.routes.insert("barker".parse().unwrap(), Route { weights: weights(&[("v1", 90), ("v2", 10)]), clients });
        set.routes
            .insert("emitter".parse().unwrap(), Route { weights: weights(&[("v1", 100)]), clients: BTreeMap::new() });
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(
            json,
            r#"{"routes":{"barker":{"weights":{"v1":90,"v2":10},"clients":{"monolith":{"v1":70,"v2":30}}},"emitter":{"weights":{"v1":100}}}}"#
        );
        assert_eq!(serde_json::from_str::<RouteSet>(&json).unwrap(), set);
        let bad_sum = r#"{"routes":{"emitter":{"weights":{"v1":90}}}}"#;
        let err = serde_json::from_str::<RouteSet>(bad_sum).unwrap_err().to_string();
        assert!(err.contains("weights sum to 90, they must sum to 100"), "{err}");
    }

    #[test]
    fn weights_for_prefers_the_clients_own_entry() {
        let set = parse_files([(
            "routes/barker.yaml",
            "barker:\n  weights: {v1: 90, v2: 10}\n  clients:\n    monolith: {v1: 70, v2: 30}\nemitter: {v1: 100}\n",
        )])
        .unwrap();
        let barker: ServiceName = "barker".parse().unwrap();
        let monolith: ClientName = "monolith".parse().unwrap();
        let other: ClientName = "vm7".parse().unwrap();
        assert_eq!(set.weights_for(&barker, Some(&monolith)), Some(&weights(&[("v1", 70), ("v2", 30)])));
        assert_eq!(set.weights_for(&barker, Some(&other)), Some(&weights(&[("v1", 90), ("v2", 10)])));
        assert_eq!(set.weights_for(&barker, None), Some(&weights(&[("v1", 90), ("v2", 10)])));
        let emitter: ServiceName = "emitter".parse().unwrap();
        assert_eq!(set.weights_for(&emitter, Some(&monolith)), Some(&weights(&[("v1", 100)])));
        assert_eq!(set.weights_for(&"nobody".parse().unwrap(), Some(&monolith)), None);
    }

    #[test]
    fn load_dir_reads_yaml_files_in_order_and_ignores_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(load_dir(tmp.path(), "routes"), Ok(RouteSet::default()), "missing dir = no routes");
        let dir = tmp.path().join("routes");
        std::fs::create_dir_all(dir.join("nested.yaml")).unwrap();
        std::fs::write(dir.join("nested.yaml/deep.yaml"), "deep: {v1: 100}\n").unwrap();
        std::fs::write(dir.join("b.yml"), "barker: {v1: 100}\n").unwrap();
        std::fs::write(dir.join("a.yaml"), "emitter: {v1: 100}\n").unwrap();
        std::fs::write(dir.join("README.md"), "not: [yaml\n").unwrap();
        let set = load_dir(tmp.path(), "routes/").unwrap();
        let names: Vec<_> = set.routes.keys().map(ServiceName::as_str).collect();
        assert_eq!(names, ["barker", "emitter"]);

        std::fs::write(dir.join("c.yaml"), "emitter: {v1: 50}\n").unwrap();
        std::fs::write(dir.join("d.yaml"), [0xff, 0xfe]).unwrap();
        let errors: Vec<String> = load_dir(tmp.path(), "routes").unwrap_err().iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errors,
            [
                "routes/d.yaml:1:1: the file is not UTF-8 text; routes files are UTF-8 YAML",
                "routes/c.yaml:1:1: emitter: service is already defined at routes/a.yaml:1:1; define each service once",
                "routes/c.yaml:1:11: emitter: weights sum to 50, they must sum to 100",
            ]
        );
    }

    #[test]
    fn a_commit_is_bounded_in_files_and_bytes() {
        let big = vec![b'#'; MAX_FILE_BYTES as usize + 1];
        let errors = read_files(vec![
            ("routes/a.yaml".into(), Content::Bytes(b"a: {v1: 100}\n".to_vec())),
            ("routes/big.yaml".into(), read_bounded(big.len() as u64, || Ok::<_, ()>(big.clone())).unwrap()),
        ])
        .unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            format!(
                "routes/big.yaml:1:1: the file is {} bytes; a routes file may be at most {MAX_FILE_BYTES} bytes",
                big.len()
            )
        );
        let many: Vec<RawFile> =
            (0..=MAX_FILES).map(|n| (format!("routes/s{n}.yaml"), Content::Bytes(Vec::new()))).collect();
        let errors = read_files(many).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            format!("routes:1:1: {} routes files; a commit may hold at most {MAX_FILES}", MAX_FILES + 1)
        );
    }

    #[test]
    fn load_dir_reports_a_routes_path_that_is_not_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("routes"), "").unwrap();
        let errors = load_dir(tmp.path(), "routes").unwrap_err();
        assert_eq!((errors[0].file.as_str(), errors[0].line, errors[0].column), ("routes", 1, 1));
        assert!(errors[0].message.starts_with("cannot read the routes directory: "), "{}", errors[0]);
    }
}
