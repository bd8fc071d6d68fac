//! A client of the directory's `/v1` API, shared by watson, sherlock and dw.

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::directory::api::{InstanceStatus, Status};
use crate::model::{DirectoryAddr, Heartbeat, InstanceId, Snapshot};

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
        format!("{}{}", self.addr.base, path)
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

    pub async fn heartbeat(&self, id: &InstanceId, heartbeat: &Heartbeat) -> Result<(), ClientError> {
        let _: serde_json::Value =
            self.send(self.http.put(self.url(&format!("/v1/instances/{id}"))).json(heartbeat)).await?;
        Ok(())
    }

    pub async fn deregister(&self, id: &InstanceId) -> Result<(), ClientError> {
        let _: serde_json::Value = self.send(self.http.delete(self.url(&format!("/v1/instances/{id}")))).await?;
        Ok(())
    }

    /// A blocking query: returns when the snapshot's index is above `index`
    /// or `wait` has passed. `me` names the asking sherlock and the index it
    /// has applied.
    pub async fn snapshot(&self, index: u64, wait: Duration, me: Option<(&str, u64)>) -> Result<Snapshot, ClientError> {
        let mut query = vec![("index", index.to_string()), ("wait", format!("{}ms", wait.as_millis()))];
        if let Some((name, applied)) = me {
            query.push(("sherlock", name.to_string()));
            query.push(("applied", applied.to_string()));
        }
        let req = self.http.get(self.url("/v1/snapshot")).query(&query).timeout(wait + Duration::from_secs(10));
        self.send(req).await
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        self.send(self.http.get(self.url("/v1/status"))).await
    }

    /// `POST /v1/reconcile`: fetch the routes repo now.
    pub async fn reconcile(&self) -> Result<crate::directory::reconcile::RoutesStatus, ClientError> {
        self.send(self.http.post(self.url("/v1/reconcile")).timeout(Duration::from_secs(70))).await
    }

    pub async fn instances(&self) -> Result<Vec<InstanceStatus>, ClientError> {
        self.send(self.http.get(self.url("/v1/instances"))).await
    }
}

/// Capped exponential backoff with full jitter, for every retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap, attempt: 0 }
    }

    /// The next delay: uniform in [ceiling/2, ceiling] where the ceiling
    /// doubles per failure up to the cap. The half floor keeps retries from
    /// bunching at zero; the jitter keeps many clients from retrying in step.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays[7] >= Duration::from_millis(500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
