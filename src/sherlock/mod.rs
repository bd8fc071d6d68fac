//! sherlock: follows the directory's snapshot and keeps a local HAProxy
//! configured to match it.
//!
//! Two tasks: the subscriber long-polls the directories (failing over from
//! one to the next) and drops each snapshot into a `watch` channel; the
//! applier takes the newest one, renders, diffs and applies it. The channel
//! keeps only the latest snapshot, so a burst of changes is applied once.

pub mod haproxy;
pub mod render;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::client::{Backoff, DirectoryClient};
use crate::model::{DirectoryAddr, Snapshot};
use crate::routes::ClientName;
use haproxy::{Haproxy, Paths};
use render::{Renderer, Site};

pub const DEFAULT_CONFIG: &str = "/etc/datawire/sherlock.yaml";
/// How long one blocking query waits for a change.
const POLL_WAIT: Duration = Duration::from_secs(30);

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
    pub name: String,
    /// The client whose per-client routes this sherlock follows.
    pub client: ClientName,
}

/// `/etc/datawire/sherlock.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub directories: Vec<DirectoryAddr>,
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    #[serde(default)]
    pub haproxy: Option<PathBuf>,
    #[serde(default)]
    pub template: Option<PathBuf>,
    #[serde(default)]
    pub client: Option<ClientName>,
}

/// From a warming snapshot, backends are added but none removed: a directory
/// that has just restarted has not heard every heartbeat yet.
pub fn keep_backends(previous: &Snapshot, next: &Snapshot) -> Snapshot {
    let mut merged = next.clone();
    for (name, prev) in &previous.services {
        let svc = merged.services.entry(name.clone()).or_default();
        for backend in &prev.backends {
            if !svc.backends.iter().any(|b| b.id == backend.id) {
                svc.backends.push(backend.clone());
            }
        }
        svc.backends.sort_by(|a, b| a.id.cmp(&b.id));
    }
    merged
}

/// Writes a file so that readers see the old or the new content, never half.
fn write_atomic(path: &Path, content: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}

/// The applier's state: what runs now.
struct Applier {
    renderer: Renderer,
    site: Site,
    haproxy: Haproxy,
    /// The config HAProxy runs (the file in place).
    running: String,
    /// The snapshot it was rendered from, after warming merges and with this
    /// client's routes in place.
    applied: Snapshot,
    /// Whose per-client routes to follow.
    client: ClientName,
    /// Shared with the subscriber, which reports it to the directory.
    applied_index: Arc<AtomicU64>,
}

impl Applier {
    fn snapshot_file(&self) -> PathBuf {
        self.haproxy.paths.run_dir.join("snapshot.json")
    }

    /// Renders `next`, and applies it if the config differs from what runs.
    async fn apply(&mut self, next: &Snapshot) -> anyhow::Result<()> {
        let _span = tracing::info_span!("apply", index = next.index, warming = next.warming).entered();
        let mine = next.for_client(Some(&self.client));
        let effective = if next.warming { keep_backends(&self.applied, &mine) } else { mine };
        let candidate = self.renderer.render(&self.site, &effective)?;
        match render::diff(&self.running, &candidate) {
            None => tracing::debug!("config unchanged"),
            Some(diff) => {
                tracing::info!("haproxy.cfg changes:\n{diff}");
                let paths = &self.haproxy.paths;
                std::fs::write(&paths.candidate, &candidate).context("writing the candidate config")?;
                self.haproxy.check(&paths.candidate).await?;
                std::fs::rename(&paths.candidate, &paths.config).context("moving the candidate into place")?;
                if let Err(e) = self.haproxy.reload().await {
                    // Put back the file that matches the worker still serving.
                    write_atomic(&self.haproxy.paths.config, &self.running).ok();
                    return Err(e.into());
                }
                self.running = candidate;
                tracing::info!("haproxy reloaded");
            }
        }
        self.applied = effective;
        self.applied_index.store(next.index, Ordering::SeqCst);
        if let Ok(json) = serde_json::to_string(&self.applied) {
            if let Err(e) = write_atomic(&self.snapshot_file(), &json) {
                tracing::warn!(error = %e, "could not save the snapshot for a fast restart");
            }
        }
        Ok(())
    }
}

/// Runs sherlock until `shutdown`, then stops its HAProxy.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.run_dir)
        .with_context(|| format!("creating --run-dir {}", config.run_dir.display()))?;
    // HAProxy reads a relative socket path as host:port: make it absolute.
    let run_dir = std::fs::canonicalize(&config.run_dir)?;
    let paths = Paths::new(&run_dir);
    let renderer = Renderer::new(config.template.as_deref())?;
    let site = Site { bind: config.listen.to_string(), admin_socket: paths.admin_socket.clone() };

    // Fail static across restarts: serve the last applied snapshot at once.
    let cached: Snapshot = std::fs::read_to_string(config.run_dir.join("snapshot.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    let mut applier = Applier {
        running: String::new(),
        renderer,
        site,
        haproxy: Haproxy::new(config.haproxy.clone(), paths),
        applied: Snapshot::default(),
        applied_index: Arc::new(AtomicU64::new(0)),
        client: config.client.clone(),
    };
    start_haproxy(&mut applier, &cached).await?;

    let (tx, mut rx) = watch::channel::<Option<Snapshot>>(None);
    let subscriber = tokio::spawn(subscribe(config.clone(), tx, applier.applied_index.clone(), shutdown.clone()));

    let mut restarts = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            changed = rx.changed() => {
                if changed.is_err() { break Ok(()) }
                let Some(next) = rx.borrow_and_update().clone() else { continue };
                if let Err(e) = applier.apply(&next).await {
                    tracing::error!(index = next.index, error = format!("{e:#}"), "snapshot not applied; the running config stays");
                }
            }
            status = applier.haproxy.exited() => {
                let delay = restarts.next_delay();
                tracing::error!(%status, restart_in = ?delay, "haproxy exited unexpectedly");
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                let applied = applier.applied.clone();
                match start_haproxy(&mut applier, &applied).await {
                    Ok(()) => restarts.reset(),
                    Err(e) => tracing::error!(error = format!("{e:#}"), "could not restart haproxy"),
                }
            }
        }
    };
    subscriber.abort();
    applier.haproxy.stop().await;
    result
}

/// Renders `snapshot` (or, if HAProxy rejects that, no services at all),
/// puts it in place and starts HAProxy on it.
async fn start_haproxy(applier: &mut Applier, snapshot: &Snapshot) -> anyhow::Result<()> {
    let paths = applier.haproxy.paths.clone();
    let mut config = applier.renderer.render(&applier.site, snapshot)?;
    let mut applied = snapshot.clone();
    write_atomic(&paths.config, &config).context("writing haproxy.cfg")?;
    if let Err(e) = applier.haproxy.check(&paths.config).await {
        tracing::warn!(error = %e, "the saved snapshot does not render a valid config; starting empty");
        applied = Snapshot::default();
        config = applier.renderer.render(&applier.site, &applied)?;
        write_atomic(&paths.config, &config).context("writing haproxy.cfg")?;
        applier.haproxy.check(&paths.config).await?;
    }
    applier.haproxy.start().await?;
    applier.running = config;
    applier.applied = applied;
    Ok(())
}

/// Follows the directories' snapshots, failing over in order, and reports
/// the applied index with every query.
async fn subscribe(
    config: Config,
    tx: watch::Sender<Option<Snapshot>>,
    applied: Arc<AtomicU64>,
    shutdown: CancellationToken,
) {
    let clients: Vec<DirectoryClient> =
        config.directories.iter().map(|d| DirectoryClient::new(d.clone(), Duration::from_secs(5))).collect();
    let mut current = 0;
    let mut index = 0;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let client = &clients[current];
        let me = (config.name.as_str(), applied.load(Ordering::SeqCst));
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = client.snapshot(index, POLL_WAIT, Some(me)) => r,
        };
        match result {
            Ok(snapshot) => {
                backoff.reset();
                if snapshot.index == index {
                    continue; // the wait ended without a change
                }
                index = snapshot.index;
                tracing::debug!(index, directory = %client.addr, "snapshot received");
                tx.send_replace(Some(snapshot));
                // Let the applier finish, so the next query reports it.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                while applied.load(Ordering::SeqCst) != index && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "directory unreachable; keeping the running config");
                if clients.len() > 1 {
                    current = (current + 1) % clients.len();
                    index = 0; // indexes are per directory
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, ServiceBackends};

    fn snap(index: u64, warming: bool, ids: &[&str]) -> Snapshot {
        let backends = ids
            .iter()
            .map(|id| Backend {
                id: id.parse().unwrap(),
                url: "http://h:1".parse().unwrap(),
                version: "v1".parse().unwrap(),
                weight: 1,
            })
            .collect();
        let mut s = Snapshot { index, warming, ..Snapshot::default() };
        s.services.insert("emitter".parse().unwrap(), ServiceBackends { backends });
        s
    }

    #[test]
    fn warming_snapshots_add_but_never_remove() {
        let prev = snap(5, false, &["a", "b"]);
        let next = snap(1, true, &["c"]);
        let merged = keep_backends(&prev, &next);
        let ids: Vec<&str> =
            merged.services[&"emitter".parse().unwrap()].backends.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(merged.index, 1);
    }
}
