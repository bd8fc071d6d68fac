//! The `/v1` wire types that the directory serves and its clients (watson,
//! sherlock, dw) read: one module both sides import, so neither reaches
//! into the other (see ARCHITECTURE.md, "Layers").
//!
//! The heartbeat body and the snapshot are in [`crate::model`], beside the
//! names they are made of.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{InstanceId, InstanceUrl, ServiceName, SnapshotId, Version};
use crate::routes::RouteSet;

/// The longest a blocking query may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// The answer to `PUT` and `DELETE /v1/instances/{id}`: the first snapshot
/// that holds the write, so a client can wait for exactly its change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteAck {
    /// For a `DELETE`: whether the instance was registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<bool>,
    pub epoch: u64,
    pub index: u64,
    /// For a `PUT`: the largest `ttl_ms` this directory accepts (its
    /// `--max-ttl`), so that a watson whose own TTL is longer heartbeats
    /// often enough to stay inside it. Absent from older directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ttl_ms: Option<u64>,
}

impl WriteAck {
    pub fn id(&self) -> SnapshotId {
        SnapshotId { epoch: self.epoch, index: self.index }
    }
}

/// The query of `GET /v1/snapshot`, as the client sends it and the server
/// reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotQuery {
    /// The snapshot the client holds; the answer comes at once when the
    /// directory's differs from it, else when it changes or `wait` ends.
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub index: u64,
    /// How long to wait for a change, e.g. `30s`; none answers at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
    /// The asking sherlock's name and the snapshot it has applied, so that
    /// `dw apply` can wait for convergence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sherlock: Option<String>,
    /// The client whose routes it follows (`--client`), checked against a
    /// sherlock token's `client:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
}

/// One instance as `/v1/instances` and `/v1/status` list it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub id: InstanceId,
    pub service: ServiceName,
    pub version: Version,
    pub url: InstanceUrl,
    pub ttl_ms: u64,
    /// Milliseconds since its last heartbeat.
    pub last_heartbeat_ms: u64,
}

/// One sherlock as `/v1/status` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SherlockStatus {
    pub name: String,
    /// The client whose routes it follows, when it said (older sherlocks
    /// do not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The snapshot it has applied to its HAProxy: (applied_epoch, applied).
    #[serde(default)]
    pub applied_epoch: u64,
    pub applied: u64,
    pub peer: String,
    pub last_seen_ms: u64,
}

impl SherlockStatus {
    pub fn applied_id(&self) -> SnapshotId {
        SnapshotId { epoch: self.applied_epoch, index: self.applied }
    }
}

/// Why a routes commit was kept out of traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectKind {
    /// Its routes files do not validate.
    #[default]
    Invalid,
    /// The branch moved to a commit that does not descend from the one in
    /// force (a force-push rewinding it), and the directory runs without
    /// `--allow-rewind`.
    Rewind,
    /// It removes every route, without the `Dstack-Allow-Empty: yes`
    /// trailer.
    Empty,
}

/// A routes commit that failed validation and is kept out of traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub commit: String,
    pub summary: String,
    /// Why: invalid files, a rewind, or every route removed.
    #[serde(default)]
    pub kind: RejectKind,
    /// Each as `routes/barker.yaml:3:7: message`, or the one reason of a
    /// rewind or an emptying commit and what would let it through.
    pub errors: Vec<String>,
    /// RFC 3339.
    pub at: String,
}

/// The desired-state half of `/v1/status`, and the answer to
/// `POST /v1/reconcile`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesStatus {
    /// The repo followed.
    pub repo: String,
    pub branch: String,
    /// The commit in force (the last good one), if any.
    pub commit: Option<String>,
    pub summary: Option<String>,
    /// When the repo was last fetched successfully (RFC 3339).
    pub fetched_at: Option<String>,
    /// The newest commit that failed validation, while it is the branch head.
    pub rejected: Option<Rejected>,
    /// Why the last fetch failed, while it keeps failing.
    pub error: Option<String>,
    /// Set until the first successful fetch of this run: the commit in
    /// force is the one a previous run accepted, read from the mirror in
    /// the state dir (`not fetched since start`).
    #[serde(default)]
    pub stale: Option<String>,
    /// When the fetch under way started (RFC 3339); None when none is.
    #[serde(default)]
    pub fetching_since: Option<String>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub address: Option<String>,
    pub uptime_s: u64,
    /// The snapshot served: (epoch, index).
    #[serde(default)]
    pub epoch: u64,
    pub index: u64,
    pub commit: Option<String>,
    pub warming: bool,
    pub warnings: Vec<String>,
    pub instances: Vec<InstanceStatus>,
    pub sherlocks: Vec<SherlockStatus>,
    /// The routes repo: commit in force, rejected commit, fetch error.
    pub routes: Option<RoutesStatus>,
    /// The desired weights in force.
    #[serde(default)]
    pub desired: RouteSet,
}

impl Status {
    /// The snapshot served when this status was read.
    pub fn snapshot_id(&self) -> SnapshotId {
        SnapshotId { epoch: self.epoch, index: self.index }
    }
}

/// Every refusal, from every endpoint: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// On a heartbeat refused for its `ttl_ms`: the largest this directory
    /// accepts, so that watson can adapt instead of being refused again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ttl_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Old directories and old watsons: the field is optional both ways.
    #[test]
    fn max_ttl_ms_is_optional_both_ways() {
        let old: WriteAck = serde_json::from_str(r#"{"epoch":1,"index":2}"#).unwrap();
        assert_eq!(old.max_ttl_ms, None);
        let new = WriteAck { removed: None, epoch: 1, index: 2, max_ttl_ms: Some(10_000) };
        let json = serde_json::to_string(&new).unwrap();
        assert_eq!(json, r#"{"epoch":1,"index":2,"max_ttl_ms":10000}"#);
        // What an older watson reads: its WriteAck had no such field, and
        // unknown fields are ignored.
        #[derive(Deserialize)]
        struct OldAck {
            epoch: u64,
            index: u64,
        }
        let read: OldAck = serde_json::from_str(&json).unwrap();
        assert_eq!((read.epoch, read.index), (1, 2));
        let refusal: ErrorBody = serde_json::from_str(r#"{"error":"no"}"#).unwrap();
        assert_eq!(refusal.max_ttl_ms, None);
    }
}
