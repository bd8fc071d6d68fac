//! sherlock: follows the directory's snapshot and keeps a local HAProxy
//! configured to match it.
//!
//! Two tasks: the subscriber long-polls the directories (failing over from
//! one to the next) and drops each snapshot into a `watch` channel; the
//! applier takes the newest one, renders, diffs and applies it. The channel
//! keeps only the latest snapshot, so a burst of changes is applied once.

pub mod admin;
pub mod haproxy;
pub mod render;
pub mod runtime;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Where `/metrics` and `/status` are served; None turns them off.
    pub admin: Option<SocketAddr>,
    /// How changes reach HAProxy.
    pub mode: ApplyMode,
    /// Changes closer together than this are applied as one (capped at 1 s).
    pub coalesce: Duration,
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
    #[serde(default)]
    pub admin: Option<SocketAddr>,
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

/// How changes reach HAProxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ApplyMode {
    /// Servers through the Runtime API; a seamless reload only when more changed.
    Runtime,
    /// A seamless reload for every change (the baseline benchmarks compare with).
    Reload,
}

/// A server being drained: it takes no new requests and is deleted once
/// its connections end, or after `DRAIN_LIMIT`.
struct Draining {
    line: runtime::ServerLine,
    since: Instant,
}

/// The longest a removed server is kept for its open connections.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// How often runtime state is read back and compared.
const DRIFT_EVERY: Duration = Duration::from_secs(5);

/// The applier's state: what runs now.
struct Applier {
    renderer: Renderer,
    site: Site,
    haproxy: Haproxy,
    mode: ApplyMode,
    /// The config HAProxy runs (the file in place, modulo runtime changes
    /// already written to it).
    running: String,
    /// `running` read for the runtime plan, kept so only the candidate is
    /// read on each change (10,000 servers take milliseconds to read).
    running_shape: runtime::Shape,
    /// The snapshot it was rendered from, after warming merges and with this
    /// client's routes in place.
    applied: Snapshot,
    /// Whose per-client routes to follow.
    client: ClientName,
    /// The applied index, watched by the subscriber to report it at once.
    applied_index: watch::Sender<u64>,
    /// Servers removed from the config that HAProxy still holds.
    draining: BTreeMap<(String, String), Draining>,
    shared: Arc<admin::Shared>,
}

/// True when a Runtime API answer reports success. A command that succeeds
/// silently still answers an empty line; no bytes at all means the
/// connection dropped (a reload in between) and the command may be lost.
fn runtime_ok(answer: &str) -> bool {
    let a = answer.trim();
    !answer.is_empty() && (a.is_empty() || a.starts_with("New server registered") || a.starts_with("Server deleted"))
}

impl Applier {
    fn snapshot_file(&self) -> PathBuf {
        self.haproxy.paths.run_dir.join("snapshot.json")
    }

    fn metrics(&self) -> &admin::Metrics {
        &self.shared.metrics
    }

    /// Sends Runtime API commands in order; the first refusal stops them.
    async fn runtime(&self, commands: &[String]) -> anyhow::Result<()> {
        for command in commands {
            let answer = self.haproxy.runtime_command(command).await?;
            self.metrics().runtime_commands.fetch_add(1, Ordering::Relaxed);
            if !runtime_ok(&answer) {
                anyhow::bail!("haproxy refused `{command}`: {}", answer.trim());
            }
            tracing::debug!(%command, "runtime api");
        }
        Ok(())
    }

    /// Renders `next`, and applies it if the config differs from what runs.
    async fn apply(&mut self, next: &Snapshot) -> anyhow::Result<()> {
        let _span = tracing::info_span!("apply", index = next.index, warming = next.warming).entered();
        let mine = next.for_client(Some(&self.client));
        let effective = if next.warming { keep_backends(&self.applied, &mine) } else { mine };
        let candidate = self.renderer.render(&self.site, &effective)?;
        let changed = match render::diff(&self.running, &candidate) {
            None => {
                tracing::debug!("config unchanged");
                self.metrics().unchanged.fetch_add(1, Ordering::Relaxed);
                false
            }
            Some(diff) => {
                tracing::info!("haproxy.cfg changes:\n{diff}");
                if !self.apply_at_runtime(&candidate).await {
                    self.reload(&candidate).await?;
                }
                true
            }
        };
        self.applied = effective;
        self.metrics().applied_index.store(next.index, Ordering::Relaxed);
        self.applied_index.send_replace(next.index);
        {
            let mut status = self.shared.status.lock().unwrap();
            status.applied_index = next.index;
            status.applied_commit = next.commit.clone();
            status.services = self.applied.services.len();
            status.servers = self.applied.services.values().map(|s| s.backends.len()).sum();
            status.draining = self.draining.len();
            status.last_error = None;
        }
        // The saved snapshot only has to render what runs: an unchanged
        // config needs no new copy on disk.
        if !changed {
            return Ok(());
        }
        if let Ok(json) = serde_json::to_string(&self.applied) {
            if let Err(e) = write_atomic(&self.snapshot_file(), &json) {
                tracing::warn!(error = %e, "could not save the snapshot for a fast restart");
            }
        }
        Ok(())
    }

    /// Applies a server-only change through the Runtime API; false when a
    /// reload is needed instead (or the runtime change failed part-way: the
    /// reload then puts everything right).
    async fn apply_at_runtime(&mut self, candidate: &str) -> bool {
        if self.mode != ApplyMode::Runtime || !self.haproxy.is_running() {
            return false;
        }
        let lines: BTreeMap<(String, String), runtime::ServerLine> =
            self.draining.iter().map(|(k, d)| (k.clone(), d.line.clone())).collect();
        let shape = runtime::Shape::of(candidate);
        let Some(ops) = runtime::plan(&self.running_shape, &shape, &lines) else { return false };
        let commands: Vec<String> = ops.iter().flat_map(runtime::Op::commands).collect();
        if let Err(e) = self.runtime(&commands).await {
            tracing::warn!(error = format!("{e:#}"), "runtime change failed; reloading instead");
            return false;
        }
        let old = &self.running_shape.servers;
        for op in &ops {
            match op {
                runtime::Op::Drain { backend, server } => {
                    if let Some(line) = old.get(backend).and_then(|s| s.get(server)) {
                        self.draining.insert(
                            (backend.clone(), server.clone()),
                            Draining { line: line.clone(), since: Instant::now() },
                        );
                    }
                }
                runtime::Op::Undrain { backend, server, .. } => {
                    self.draining.remove(&(backend.clone(), server.clone()));
                }
                _ => {}
            }
        }
        // The file matches what runs, so a later reload reproduces it.
        if let Err(e) = write_atomic(&self.haproxy.paths.config, candidate) {
            tracing::warn!(error = %e, "could not write haproxy.cfg after a runtime change");
        }
        self.running = candidate.to_string();
        self.running_shape = shape;
        self.metrics().runtime_applies.fetch_add(1, Ordering::Relaxed);
        tracing::info!(commands = commands.len(), "applied through the runtime api, no reload");
        true
    }

    /// Checks the candidate, puts it in place and reloads seamlessly.
    async fn reload(&mut self, candidate: &str) -> anyhow::Result<()> {
        let paths = self.haproxy.paths.clone();
        std::fs::write(&paths.candidate, candidate).context("writing the candidate config")?;
        self.haproxy.check(&paths.candidate).await?;
        std::fs::rename(&paths.candidate, &paths.config).context("moving the candidate into place")?;
        if let Err(e) = self.haproxy.reload().await {
            self.metrics().failed_reloads.fetch_add(1, Ordering::Relaxed);
            // Put back the file that matches the worker still serving.
            write_atomic(&paths.config, &self.running).ok();
            return Err(e.into());
        }
        self.metrics().reloads.fetch_add(1, Ordering::Relaxed);
        // The new worker has only what the file lists: nothing drains.
        self.draining.clear();
        self.running = candidate.to_string();
        self.running_shape = runtime::Shape::of(candidate);
        tracing::info!("haproxy reloaded");
        Ok(())
    }

    /// Deletes drained servers whose connections have ended.
    async fn reap(&mut self) {
        if self.draining.is_empty() || !self.haproxy.is_running() {
            return;
        }
        let sessions = match self.haproxy.runtime_command("show stat -1 4 -1").await {
            Ok(csv) => parse_sessions(&csv),
            Err(_) => return,
        };
        let mut done = Vec::new();
        for ((backend, server), d) in &self.draining {
            let busy = sessions.get(&(backend.clone(), server.clone())).copied().unwrap_or(0);
            if busy > 0 && d.since.elapsed() < DRAIN_LIMIT {
                continue;
            }
            let commands =
                [format!("set server {backend}/{server} state maint"), format!("del server {backend}/{server}")];
            match self.runtime(&commands).await {
                Ok(()) => done.push((backend.clone(), server.clone())),
                Err(e) if e.to_string().contains("No such server") => done.push((backend.clone(), server.clone())),
                Err(e) => tracing::debug!(error = %e, "a drained server is not deletable yet"),
            }
        }
        for key in done {
            tracing::info!(backend = %key.0, server = %key.1, "drained server deleted");
            self.draining.remove(&key);
        }
    }

    /// Reads the runtime state back and corrects anything that differs from
    /// the running config (an operator's `set server`, a lost command).
    async fn correct_drift(&mut self) {
        if !self.haproxy.is_running() {
            return;
        }
        let Ok(text) = self.haproxy.runtime_command("show servers state").await else { return };
        let actual = runtime::parse_servers_state(&text);
        let wanted = &self.running_shape.servers;
        let lines = self.draining.iter().map(|(k, d)| (k.clone(), d.line.clone())).collect();
        let fixes = runtime::drift(wanted, &actual, &lines);
        if fixes.is_empty() {
            return;
        }
        tracing::warn!(fixes = ?fixes, "haproxy's runtime state drifted from the config; correcting");
        self.metrics().drift_corrections.fetch_add(fixes.len() as u64, Ordering::Relaxed);
        if let Err(e) = self.runtime(&fixes).await {
            tracing::warn!(error = format!("{e:#}"), "could not correct drift at runtime; reloading");
            let running = self.running.clone();
            if let Err(e) = self.reload(&running).await {
                tracing::error!(error = format!("{e:#}"), "reload after drift failed");
            }
        }
    }
}

/// Current sessions per (backend, server) from `show stat` CSV.
fn parse_sessions(csv: &str) -> BTreeMap<(String, String), u64> {
    csv.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some(((f.first()?.to_string(), f.get(1)?.to_string()), f.get(4)?.parse().ok()?))
        })
        .collect()
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
    let shared = Arc::new(admin::Shared::default());
    {
        let mut status = shared.status.lock().unwrap();
        status.name = config.name.clone();
        status.client = config.client.to_string();
    }
    let admin_server = match config.admin {
        Some(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding --admin {addr}"))?;
            tracing::info!(%addr, "admin endpoint listening (/metrics, /status)");
            let app = admin::app(shared.clone());
            let stop = shutdown.clone();
            Some(tokio::spawn(async move {
                axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await.ok();
            }))
        }
        None => None,
    };

    // Fail static across restarts: serve the last applied snapshot at once.
    let cached: Snapshot = std::fs::read_to_string(run_dir.join("snapshot.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    let (applied_tx, applied_rx) = watch::channel(0u64);
    let mut applier = Applier {
        running: String::new(),
        running_shape: runtime::Shape::default(),
        renderer,
        site,
        haproxy: Haproxy::new(config.haproxy.clone(), paths),
        mode: config.mode,
        applied: Snapshot::default(),
        client: config.client.clone(),
        applied_index: applied_tx,
        draining: BTreeMap::new(),
        shared: shared.clone(),
    };
    start_haproxy(&mut applier, &cached).await?;
    shared.status.lock().unwrap().haproxy_running = true;

    let (tx, mut rx) = watch::channel::<Option<Snapshot>>(None);
    let subscriber = tokio::spawn(subscribe(config.clone(), tx, applied_rx, shared.clone(), shutdown.clone()));

    let mut restarts = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut reap_every = tokio::time::interval(Duration::from_millis(500));
    let mut drift_every = tokio::time::interval(DRIFT_EVERY);
    drift_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A failed apply is retried with backoff until a newer snapshot comes.
    let mut retries = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut retry_at: Option<tokio::time::Instant> = None;
    // When the last apply ended, for coalescing.
    let mut last_apply: Option<Instant> = None;
    let result = loop {
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = retry => {
                retry_at = None;
                // Mark the latest snapshot unseen, so the branch below applies it again.
                rx.mark_changed();
            }
            changed = rx.changed() => {
                if changed.is_err() { break Ok(()) }
                let arrived = Instant::now();
                // Changes that come close together are applied as one; a
                // change after a quiet spell is applied at once.
                let busy = last_apply.is_some_and(|t: Instant| t.elapsed() < config.coalesce);
                if busy {
                    let cap = arrived + Duration::from_secs(1);
                    loop {
                        let quiet = tokio::time::sleep(config.coalesce);
                        tokio::select! {
                            _ = quiet => break,
                            more = rx.changed() => if more.is_err() || Instant::now() >= cap { break },
                        }
                    }
                }
                let Some(next) = rx.borrow_and_update().clone() else { continue };
                let result = applier.apply(&next).await;
                last_apply = Some(Instant::now());
                match result {
                    Ok(()) => {
                        applier.shared.metrics.observe_apply(arrived.elapsed());
                        retries.reset();
                        retry_at = None;
                        applier.correct_drift().await;
                    }
                    Err(e) => {
                        applier.shared.metrics.failed_applies.fetch_add(1, Ordering::Relaxed);
                        let e = format!("{e:#}");
                        let delay = retries.next_delay();
                        tracing::error!(index = next.index, error = %e, retry_in = ?delay, "snapshot not applied; the running config stays");
                        applier.shared.status.lock().unwrap().last_error = Some(e);
                        retry_at = Some(tokio::time::Instant::now() + delay);
                    }
                }
            }
            _ = reap_every.tick() => applier.reap().await,
            _ = drift_every.tick() => applier.correct_drift().await,
            status = applier.haproxy.exited() => {
                applier.shared.status.lock().unwrap().haproxy_running = false;
                let delay = restarts.next_delay();
                tracing::error!(%status, restart_in = ?delay, "haproxy exited unexpectedly");
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                let applied = applier.applied.clone();
                match start_haproxy(&mut applier, &applied).await {
                    Ok(()) => {
                        restarts.reset();
                        applier.shared.status.lock().unwrap().haproxy_running = true;
                    }
                    Err(e) => tracing::error!(error = format!("{e:#}"), "could not restart haproxy"),
                }
            }
        }
    };
    subscriber.abort();
    applier.haproxy.stop().await;
    if let Some(server) = admin_server {
        server.await.ok();
    }
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
    applier.running_shape = runtime::Shape::of(&config);
    applier.running = config;
    applier.applied = applied;
    applier.draining.clear();
    Ok(())
}

/// Follows the directories' snapshots, failing over in order. Every query
/// reports the applied index; when it changes, the query is restarted so
/// the directory learns at once (for `dw apply`).
async fn subscribe(
    config: Config,
    tx: watch::Sender<Option<Snapshot>>,
    mut applied: watch::Receiver<u64>,
    shared: Arc<admin::Shared>,
    shutdown: CancellationToken,
) {
    let clients: Vec<DirectoryClient> =
        config.directories.iter().map(|d| DirectoryClient::new(d.clone(), Duration::from_secs(5))).collect();
    let mut current = 0;
    let mut index = 0;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let client = &clients[current];
        shared.status.lock().unwrap().directory = Some(client.addr.to_string());
        let me = (config.name.as_str(), *applied.borrow_and_update());
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = client.snapshot(index, POLL_WAIT, Some(me)) => r,
            changed = applied.changed() => {
                if changed.is_err() { return }
                continue;
            }
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
