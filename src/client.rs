//! A client of the directory's `/v1` API, shared by watson, sherlock and dw.

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::model::{DirectoryAddr, Heartbeat, InstanceId, Snapshot, SnapshotId};
use crate::protocol::{InstanceStatus, RoutesStatus, SnapshotQuery, Status, WriteAck};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("directory {addr} is unreachable: {source}")]
    Unreachable {
        addr: DirectoryAddr,
        #[source]
        source: reqwest::Error,
    },
    #[error("directory {addr} refused the request ({status}): {message}")]
    Refused { addr: DirectoryAddr, status: u16, message: String },
    #[error("directory {addr} sent a reply that could not be read: {source}")]
    Decode {
        addr: DirectoryAddr,
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    /// A refusal (4xx) will not go away by retrying the same request.
    pub fn is_refusal(&self) -> bool {
        matches!(self, ClientError::Refused { status, .. } if (400..500).contains(status))
    }
}

/// One directory, with its HTTP connection pool.
#[derive(Debug, Clone)]
pub struct DirectoryClient {
    /// Named in every error, so a log line says which directory failed.
    pub addr: DirectoryAddr,
    http: reqwest::Client,
}

impl DirectoryClient {
    /// `timeout` bounds plain requests; blocking queries get their wait on top.
    pub fn new(addr: DirectoryAddr, timeout: Duration) -> DirectoryClient {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .user_agent(concat!("dstack/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a reqwest client with no TLS and no proxy settings always builds");
        DirectoryClient { addr, http }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.addr.base(), path)
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let resp = req.send().await.map_err(|source| ClientError::Unreachable { addr: self.addr.clone(), source })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(body);
            return Err(ClientError::Refused { addr: self.addr.clone(), status: status.as_u16(), message });
        }
        resp.json().await.map_err(|source| ClientError::Decode { addr: self.addr.clone(), source })
    }

    /// Registers or refreshes an instance; the answer names the first
    /// snapshot that holds it.
    pub async fn heartbeat(&self, id: &InstanceId, heartbeat: &Heartbeat) -> Result<WriteAck, ClientError> {
        self.send(self.http.put(self.url(&format!("/v1/instances/{id}"))).json(heartbeat)).await
    }

    pub async fn deregister(&self, id: &InstanceId) -> Result<WriteAck, ClientError> {
        self.send(self.http.delete(self.url(&format!("/v1/instances/{id}")))).await
    }

    /// A blocking query: returns when the directory's snapshot differs from
    /// `held` or `wait` has passed. `me` names the asking sherlock and the
    /// snapshot it has applied.
    pub async fn snapshot(
        &self,
        held: SnapshotId,
        wait: Duration,
        me: Option<(&str, SnapshotId)>,
    ) -> Result<Snapshot, ClientError> {
        let query = SnapshotQuery {
            epoch: held.epoch,
            index: held.index,
            wait: Some(format!("{}ms", wait.as_millis())),
            sherlock: me.map(|(name, _)| name.to_string()),
            applied_epoch: me.map(|(_, applied)| applied.epoch),
            applied: me.map(|(_, applied)| applied.index),
        };
        let req = self.http.get(self.url("/v1/snapshot")).query(&query).timeout(wait + Duration::from_secs(10));
        self.send(req).await
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        self.send(self.http.get(self.url("/v1/status"))).await
    }

    /// `POST /v1/reconcile`: fetch the routes repo now.
    pub async fn reconcile(&self) -> Result<RoutesStatus, ClientError> {
        self.send(self.http.post(self.url("/v1/reconcile")).timeout(Duration::from_secs(70))).await
    }

    pub async fn instances(&self) -> Result<Vec<InstanceStatus>, ClientError> {
        self.send(self.http.get(self.url("/v1/instances"))).await
    }
}
