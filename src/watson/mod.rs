//! watson: checks the liveness of the instances on this host and heartbeats
//! the healthy ones to every configured directory.
//!
//! Each service has one check loop; each (service, directory) pair has its
//! own heartbeat task fed by a `watch` channel, so a directory that is down
//! or slow never delays checks or heartbeats to the others.

pub mod config;

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::client::DirectoryClient;
use crate::model::{Heartbeat, InstanceId};
pub use config::{Config, ServiceConfig};

/// The rise/fall state machine of one instance. Pure, so it is unit-tested.
#[derive(Debug, Clone)]
pub struct Health {
    rise: u32,
    fall: u32,
    /// Whether the instance is registered now.
    healthy: bool,
    /// Whether it has ever passed: the very first pass registers it at once,
    /// so a fresh instance is not held back `rise` periods.
    ever_passed: bool,
    /// Checks in a row that disagree with `healthy`.
    streak: u32,
}

impl Health {
    pub fn new(rise: u32, fall: u32) -> Health {
        Health { rise, fall, healthy: false, ever_passed: false, streak: 0 }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records one check; returns the new state when it changed.
    pub fn observe(&mut self, passed: bool) -> Option<bool> {
        if passed == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if passed {
            if self.ever_passed {
                self.rise
            } else {
                1
            }
        } else {
            self.fall
        };
        if passed {
            self.ever_passed = true;
        }
        if self.streak >= needed {
            self.healthy = passed;
            self.streak = 0;
            Some(passed)
        } else {
            None
        }
    }
}

/// Runs every configured service until `shutdown`, then deregisters them all.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().build()?;
    let mut tasks = tokio::task::JoinSet::new();
    for service in config.services {
        let id = InstanceId::derive(&service.name, &service.version, &service.url);
        tracing::info!(instance = %id, service = %service.name, url = %service.url, version = %service.version, "watching");
        let (state_tx, state_rx) = watch::channel(false);
        for addr in &config.directories {
            // Each request must end well within one period, or heartbeats
            // to this directory fall behind the TTL.
            let client = DirectoryClient::new(
                addr.clone(),
                service.period.clamp(Duration::from_millis(200), Duration::from_secs(5)),
            )
            .with_token(config.token.as_ref());
            tasks.spawn(heartbeat_loop(client, id.clone(), service.clone(), state_rx.clone(), shutdown.clone()));
        }
        tasks.spawn(check_loop(http.clone(), id, service, state_tx, shutdown.clone()));
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Checks one instance every period and publishes its health.
async fn check_loop(
    http: reqwest::Client,
    id: InstanceId,
    service: ServiceConfig,
    state: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut health = Health::new(service.rise, service.fall);
    let mut every = tokio::time::interval(service.period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let outcome = match http.get(&service.check_url).timeout(service.timeout).send().await {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(format!("status {}", resp.status())),
            Err(e) => Err(e.to_string()),
        };
        if let Err(why) = &outcome {
            tracing::debug!(instance = %id, check = %service.check_url, %why, "liveness check failed");
        }
        if let Some(now_healthy) = health.observe(outcome.is_ok()) {
            match &outcome {
                Ok(()) => tracing::info!(instance = %id, "instance is alive; registering"),
                Err(why) => {
                    tracing::warn!(instance = %id, %why, fall = service.fall, "instance failed its liveness checks; deregistering")
                }
            }
            state.send_replace(now_healthy);
        }
    }
}

/// Heartbeats one instance to one directory while it is healthy, and
/// deregisters it when it turns unhealthy or watson stops.
async fn heartbeat_loop(
    client: DirectoryClient,
    id: InstanceId,
    service: ServiceConfig,
    mut state: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let heartbeat = Heartbeat {
        service: service.name.clone(),
        version: service.version.clone(),
        url: service.url.clone(),
        ttl_ms: service.ttl().as_millis() as u64,
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), service.period);
    // What the directory was last told: None until the first success.
    let mut told: Option<bool> = None;
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next) => {}
            changed = state.changed() => if changed.is_err() { break },
        }
        let healthy = *state.borrow_and_update();
        let result = if healthy {
            client.heartbeat(&id, &heartbeat).await.map(drop)
        } else if told != Some(false) {
            client.deregister(&id).await.map(drop)
        } else {
            next = tokio::time::Instant::now() + service.period;
            continue;
        };
        match result {
            Ok(()) => {
                if told != Some(healthy) {
                    tracing::info!(instance = %id, directory = %client.addr, registered = healthy, "directory told");
                }
                told = Some(healthy);
                backoff.reset();
                next = tokio::time::Instant::now() + service.period;
            }
            Err(e) => {
                let delay = if e.is_refusal() { service.period } else { backoff.next_delay() };
                tracing::warn!(instance = %id, error = %e, retry_in = ?delay, "heartbeat failed");
                told = None;
                next = tokio::time::Instant::now() + delay;
            }
        }
    }
    if told != Some(false) {
        match client.deregister(&id).await {
            Ok(_) => tracing::info!(instance = %id, directory = %client.addr, "deregistered at shutdown"),
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "could not deregister at shutdown; the directory will expire it")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Health;

    #[test]
    fn first_pass_registers_at_once_then_rise_and_fall_apply() {
        let mut h = Health::new(2, 2);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), Some(true));
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None, "a single failure between passes resets the streak");
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(false));
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(true));
        assert!(h.healthy());
    }

    #[test]
    fn fall_of_one_is_immediate() {
        let mut h = Health::new(1, 1);
        assert_eq!(h.observe(true), Some(true));
        assert_eq!(h.observe(false), Some(false));
        assert_eq!(h.observe(true), Some(true));
    }
}
