//! The applier: takes the newest snapshot, renders `haproxy.cfg`, diffs
//! it against what runs, and applies only the difference: server changes
//! through the Runtime API, anything else by a checked, seamless reload.
//!
//! [`Applier::pass`] is one idempotent pass in the reconciler's shape
//! (render desired, read observed, diff, act on a difference); it returns
//! when it next needs to run. Retry timing is its error policy, kept apart.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::watch;

use super::admin;
use super::config::ApplyMode;
use super::haproxy::Haproxy;
use super::quiescence::Quiescence;
use super::render::{self, Renderer, Site};
use super::runtime;
use crate::backoff::Backoff;
use std::collections::BTreeSet;

use crate::model::{Backend, ClientName, Snapshot, SnapshotId, Version, MAX_BACKEND_WEIGHT};

/// From a warming snapshot, backends are added but none removed: a directory
/// that has just restarted has not heard every heartbeat yet.
///
/// A kept server shares its version's weight with the servers of that
/// version the directory does list (each gets the version's total there,
/// divided by their number and the kept ones'), so the versions keep the
/// shares the directory gave them: a kept server at its old weight beside
/// siblings re-weighted as if it were gone would skew the split (90/10
/// becoming 93/7) until the directory has heard from everyone.
pub fn keep_backends(previous: &Snapshot, next: &Snapshot) -> Snapshot {
    let mut merged = next.clone();
    for (name, prev) in &previous.services {
        let svc = merged.services.entry(name.clone()).or_default();
        let kept: Vec<Backend> =
            prev.backends.iter().filter(|b| !svc.backends.iter().any(|n| n.id == b.id)).cloned().collect();
        if kept.is_empty() {
            continue;
        }
        let versions: BTreeSet<Version> = kept.iter().map(|b| b.version.clone()).collect();
        svc.backends.extend(kept.iter().cloned());
        for version in versions {
            let serving = |b: &&mut Backend| b.version == version && b.weight > 0;
            let listed: Vec<u32> = svc
                .backends
                .iter()
                .filter(|b| b.version == version && b.weight > 0 && !kept.iter().any(|k| k.id == b.id))
                .map(|b| b.weight)
                .collect();
            if listed.is_empty() {
                continue; // none listed: the kept ones keep their weights
            }
            let total: u32 = listed.iter().sum();
            let count = svc.backends.iter_mut().filter(serving).count() as u32;
            let each = total.div_ceil(count).clamp(1, MAX_BACKEND_WEIGHT);
            for b in svc.backends.iter_mut().filter(serving) {
                b.weight = each;
            }
        }
        svc.backends.sort_by(|a, b| a.id.cmp(&b.id));
    }
    merged
}

/// HAProxy's name for a service's backend.
pub fn backend_name(service: &str) -> String {
    format!("svc_{service}")
}

/// Servers that HAProxy's own health check has marked down (backend,
/// server), for instances the directory still lists.
pub type Down = BTreeSet<(String, String)>;

/// Gives each version's weight to its servers HAProxy has up: a server
/// marked down by HAProxy's check (a dead or hung instance, before watson
/// and the directory's TTL take it out of the snapshot) takes no traffic,
/// and without this its share would go to the other versions (90/10
/// reading 82/18 with two v1 servers) until the directory drops it. The
/// down servers keep their weight, so one that comes back up takes its
/// share again at once. A version with no server up is left as it is.
pub fn spread_over_up<'a>(snapshot: &'a Snapshot, down: &Down) -> std::borrow::Cow<'a, Snapshot> {
    // Nothing down, the usual case: no copy of 10,000 backends per apply.
    if down.is_empty() {
        return std::borrow::Cow::Borrowed(snapshot);
    }
    let mut out = snapshot.clone();
    for (name, svc) in out.services.iter_mut() {
        let backend = backend_name(name.as_str());
        let is_down = |b: &Backend| down.contains(&(backend.clone(), b.id.to_string()));
        let versions: BTreeSet<Version> =
            svc.backends.iter().filter(|b| b.weight > 0 && is_down(b)).map(|b| b.version.clone()).collect();
        for version in versions {
            let of_version = |b: &Backend| b.version == version && b.weight > 0;
            let total: u32 = svc.backends.iter().filter(|b| of_version(b)).map(|b| b.weight).sum();
            let up = svc.backends.iter().filter(|b| of_version(b) && !is_down(b)).count() as u32;
            if up == 0 {
                continue;
            }
            let each = total.div_ceil(up).clamp(1, MAX_BACKEND_WEIGHT);
            for b in svc.backends.iter_mut().filter(|b| of_version(b) && !is_down(b)) {
                b.weight = each;
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A file sherlock could not write: the disk is full, the run dir is
/// read-only. The running config stays; the next pass tries again.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct WriteError {
    pub path: std::path::PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Writes `content` to `path` and syncs it to disk before returning.
fn write_synced(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(content.as_bytes())?;
    file.sync_all()
}

/// Makes a rename (or a new name) in `dir` survive a power loss.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Renames `from` over `to` durably: the directory is synced after.
pub fn rename_durably(from: &Path, to: &Path) -> Result<(), WriteError> {
    let result = std::fs::rename(from, to).and_then(|()| sync_dir(to.parent().unwrap_or(Path::new("."))));
    result.map_err(|source| WriteError { path: to.to_path_buf(), source })
}

/// Writes a file so that readers, and a machine that loses power, see the
/// old or the new content, never half: a temp file beside it, synced, then
/// renamed over it, then the directory synced. On failure the temp file is
/// removed and the old file is as it was.
pub fn write_atomic(path: &Path, content: &str) -> Result<(), WriteError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    if let Err(source) = write_synced(&tmp, content) {
        // A partial temp file would hold the space a full disk lacks.
        let _ = std::fs::remove_file(&tmp);
        return Err(WriteError { path: path.to_path_buf(), source });
    }
    rename_durably(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Writes a candidate config (synced) for `haproxy -c`; it is renamed into
/// place only once checked.
pub fn write_candidate(path: &Path, content: &str) -> Result<(), WriteError> {
    write_synced(path, content).map_err(|source| {
        let _ = std::fs::remove_file(path);
        WriteError { path: path.to_path_buf(), source }
    })
}

/// A server being drained: it takes no new requests and is deleted once
/// its connections end, or after `DRAIN_LIMIT`.
struct Draining {
    line: runtime::ServerLine,
    since: Instant,
}

/// The longest a removed server is kept for its open connections.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// The applier's state: what runs now.
pub struct Applier {
    renderer: Renderer,
    site: Site,
    pub haproxy: Haproxy,
    mode: ApplyMode,
    /// The config HAProxy runs (the file in place, modulo runtime changes
    /// already written to it).
    running: String,
    /// The services map `running` reads (`render::render_map`): on disk
    /// beside it, rewritten only with a config that needs another.
    running_map: String,
    /// `running` read for the runtime plan, kept so only the candidate is
    /// read on each change (10,000 servers take milliseconds to read).
    running_shape: runtime::Shape,
    /// The snapshot it was rendered from, after warming merges and with this
    /// client's routes in place.
    applied: Snapshot,
    /// Whose per-client routes to follow.
    client: ClientName,
    /// The applied snapshot, watched by the subscriber to report it at once.
    applied_id: watch::Sender<SnapshotId>,
    /// Servers removed from the config that HAProxy still holds.
    draining: BTreeMap<(String, String), Draining>,
    shared: Arc<admin::Shared>,
    /// Batches changes that come close together.
    quiescence: Quiescence,
    /// The error policy: a failed apply is retried with backoff until it
    /// succeeds or a newer snapshot replaces it.
    retries: Backoff,
    /// True when snapshot.json holds `applied`; false after a failed save,
    /// so the next pass saves it even if nothing else changed.
    saved: bool,
    /// Servers HAProxy's health check has marked down ([`spread_over_up`]).
    down: Down,
}

/// True when a Runtime API answer reports success. A command that succeeds
/// silently still answers an empty line; no bytes at all means the
/// connection dropped (a reload in between) and the command may be lost.
fn runtime_ok(answer: &str) -> bool {
    let a = answer.trim();
    !answer.is_empty() && (a.is_empty() || a.starts_with("New server registered") || a.starts_with("Server deleted"))
}

impl Applier {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        renderer: Renderer,
        site: Site,
        haproxy: Haproxy,
        mode: ApplyMode,
        client: ClientName,
        coalesce: Duration,
        applied_id: watch::Sender<SnapshotId>,
        shared: Arc<admin::Shared>,
    ) -> Applier {
        Applier {
            renderer,
            site,
            haproxy,
            mode,
            running: String::new(),
            running_map: String::new(),
            running_shape: runtime::Shape::default(),
            applied: Snapshot::default(),
            client,
            applied_id,
            draining: BTreeMap::new(),
            shared,
            quiescence: Quiescence::new(coalesce, Duration::from_secs(1)),
            retries: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            saved: true,
            down: Down::new(),
        }
    }

    /// A new snapshot arrived at `now`: when to apply it.
    pub fn on_change(&mut self, now: Instant) -> Instant {
        self.quiescence.on_change(now)
    }

    /// One pass: applies `next` if its config differs from what runs.
    /// Returns when to run again: None when done, a retry time on failure.
    pub async fn pass(&mut self, next: &Snapshot) -> Option<Instant> {
        let result = self.apply(next).await;
        let waited = self.quiescence.applied(Instant::now());
        match result {
            Ok(()) => {
                self.metrics().observe_apply(waited);
                self.retries.reset();
                // A server went down or up meanwhile: spread again at once.
                self.correct_drift().await.then(Instant::now)
            }
            Err(e) => {
                self.metrics().failed_applies.inc();
                if e.chain().any(|c| c.is::<WriteError>()) {
                    self.metrics().failed_writes.inc();
                }
                let e = format!("{e:#}");
                let delay = self.retries.next_delay();
                tracing::error!(index = next.index, error = %e, retry_in = ?delay, "snapshot not applied; the running config stays");
                self.shared.status.lock().unwrap().last_error = Some(e);
                Some(Instant::now() + delay)
            }
        }
    }

    fn snapshot_file(&self) -> std::path::PathBuf {
        self.haproxy.paths.run_dir.join("snapshot.json")
    }

    fn metrics(&self) -> &admin::Metrics {
        &self.shared.metrics
    }

    /// Sends Runtime API commands in order; the first refusal stops them.
    async fn runtime(&self, commands: &[String]) -> anyhow::Result<()> {
        for command in commands {
            let answer = self.haproxy.runtime_command(command).await?;
            self.metrics().runtime_commands.inc();
            if !runtime_ok(&answer) {
                anyhow::bail!("haproxy refused `{command}`: {}", answer.trim());
            }
            tracing::debug!(%command, "runtime api");
        }
        Ok(())
    }

    /// Renders `next`, and applies it if the config differs from what runs.
    async fn apply(&mut self, next: &Snapshot) -> anyhow::Result<()> {
        use tracing::Instrument as _;
        // Instrumented, not entered: a guard held across `.await` would put
        // other tasks' log lines in this span (and make the future !Send).
        let span = tracing::info_span!("apply", epoch = next.epoch, index = next.index, warming = next.warming);
        self.apply_in_span(next).instrument(span).await
    }

    async fn apply_in_span(&mut self, next: &Snapshot) -> anyhow::Result<()> {
        let mine = next.for_client(Some(&self.client));
        let effective = if next.warming { keep_backends(&self.applied, &mine) } else { mine };
        let candidate = self.renderer.render(&self.site, &spread_over_up(&effective, &self.down))?;
        // The map follows the set of services, which only a reload changes
        // (a service added or removed adds or removes its backend too).
        let map = render::render_map(&effective)?;
        let map_changed = map != self.running_map;
        let changed = match render::diff(&self.running, &candidate) {
            None if !map_changed => {
                tracing::debug!("config unchanged");
                self.metrics().unchanged.inc();
                false
            }
            // Nothing to change while it is down: its restart applies this.
            _ if !self.haproxy.is_running() => {
                anyhow::bail!("haproxy is not running; the change waits for its restart")
            }
            diff => {
                match diff {
                    Some(diff) => tracing::info!("haproxy.cfg changes:\n{diff}"),
                    None => tracing::info!("{} changes", render::SERVICES_MAP),
                }
                if map_changed || !self.apply_at_runtime(&candidate).await? {
                    self.reload(&candidate, &map).await?;
                }
                true
            }
        };
        self.applied = effective;
        self.metrics().applied_index.set(next.index as i64);
        self.applied_id.send_replace(next.id());
        {
            let mut status = self.shared.status.lock().unwrap();
            status.applied_epoch = next.epoch;
            status.applied_index = next.index;
            status.applied_commit = next.commit.clone();
            status.services = self.applied.services.len();
            status.servers = self.applied.services.values().map(|s| s.backends.len()).sum();
            status.draining = self.draining.len();
            status.last_error = None;
        }
        // The saved snapshot only has to render what runs: an unchanged
        // config needs no new copy on disk, unless the last save failed.
        if changed {
            self.saved = false;
        }
        if !self.saved {
            let json = serde_json::to_string(&self.applied).context("encoding the snapshot to save")?;
            write_atomic(&self.snapshot_file(), &json).context(
                "saving the applied snapshot (HAProxy runs it; a restarted sherlock would serve an older one)",
            )?;
            self.saved = true;
        }
        Ok(())
    }

    /// Applies a server-only change through the Runtime API; false when a
    /// reload is needed instead (or the runtime change failed part-way: the
    /// reload then puts everything right); an error when haproxy.cfg could
    /// not be written, and nothing was changed.
    async fn apply_at_runtime(&mut self, candidate: &str) -> Result<bool, WriteError> {
        if self.mode != ApplyMode::Runtime || !self.haproxy.is_running() {
            return Ok(false);
        }
        let lines: BTreeMap<(String, String), runtime::ServerLine> =
            self.draining.iter().map(|(k, d)| (k.clone(), d.line.clone())).collect();
        let shape = runtime::Shape::of(candidate);
        let Some(ops) = runtime::plan(&self.running_shape, &shape, &lines) else { return Ok(false) };
        let commands: Vec<String> = ops.iter().flat_map(runtime::Op::commands).collect();
        // The file first, so a later reload or restart reproduces what runs:
        // if it cannot be written, HAProxy is left as it is.
        write_atomic(&self.haproxy.paths.config, candidate)?;
        if let Err(e) = self.runtime(&commands).await {
            tracing::warn!(error = format!("{e:#}"), "runtime change failed; reloading instead");
            return Ok(false);
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
        self.running = candidate.to_string();
        self.running_shape = shape;
        self.metrics().runtime_applies.inc();
        tracing::info!(commands = commands.len(), "applied through the runtime api, no reload");
        Ok(true)
    }

    /// Checks the candidate, puts it in place and reloads seamlessly. The
    /// services map it reads is written first, so the check reads it, and
    /// put back if the candidate goes no further: HAProxy parses the config
    /// (check, reload, restart) only ever beside its own map.
    async fn reload(&mut self, candidate: &str, map: &str) -> anyhow::Result<()> {
        let paths = self.haproxy.paths.clone();
        let map_file = self.site.services_map();
        write_candidate(&paths.candidate, candidate)?;
        if map != self.running_map {
            write_atomic(&map_file, map)?;
        }
        let put_back_map = |applier: &Self| {
            if map != applier.running_map {
                if let Err(w) = write_atomic(&map_file, &applier.running_map) {
                    applier.metrics().failed_writes.inc();
                    tracing::error!(error = %w, "could not put back services.map; a restart of HAProxy would route by the refused one");
                }
            }
        };
        if let Err(e) = self.haproxy.check(&paths.candidate).await {
            put_back_map(self);
            return Err(e.into());
        }
        if let Err(e) = rename_durably(&paths.candidate, &paths.config) {
            put_back_map(self);
            return Err(e.into());
        }
        if let Err(e) = self.haproxy.reload().await {
            self.metrics().failed_reloads.inc();
            // Put back the files that match the worker still serving.
            if let Err(w) = write_atomic(&paths.config, &self.running) {
                self.metrics().failed_writes.inc();
                tracing::error!(error = %w, "could not put back haproxy.cfg after a failed reload; a restart of HAProxy would run the refused candidate");
            }
            put_back_map(self);
            return Err(e.into());
        }
        self.running_map = map.to_string();
        self.metrics().reloads.inc();
        // The new worker has only what the file lists: nothing drains.
        self.draining.clear();
        self.running = candidate.to_string();
        self.running_shape = runtime::Shape::of(candidate);
        tracing::info!("haproxy reloaded");
        Ok(())
    }

    /// Deletes drained servers whose connections have ended.
    pub async fn reap(&mut self) {
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
        self.shared.status.lock().unwrap().draining = self.draining.len();
    }

    /// Reads the runtime state back and corrects anything that differs from
    /// the running config (an operator's `set server`, a lost command).
    /// True when the servers HAProxy has down changed: a pass is due.
    pub async fn correct_drift(&mut self) -> bool {
        if !self.haproxy.is_running() {
            return false;
        }
        let Ok(text) = self.haproxy.runtime_command("show servers state").await else { return false };
        let actual = runtime::parse_servers_state(&text);
        let down_changed = self.observe_down(&actual);
        let wanted = &self.running_shape.servers;
        let lines = self.draining.iter().map(|(k, d)| (k.clone(), d.line.clone())).collect();
        let fixes = runtime::drift(wanted, &actual, &lines);
        if fixes.is_empty() {
            return down_changed;
        }
        tracing::warn!(fixes = ?fixes, "haproxy's runtime state drifted from the config; correcting");
        self.metrics().drift_corrections.inc_by(fixes.len() as u64);
        if let Err(e) = self.runtime(&fixes).await {
            tracing::warn!(error = format!("{e:#}"), "could not correct drift at runtime; reloading");
            let (running, map) = (self.running.clone(), self.running_map.clone());
            if let Err(e) = self.reload(&running, &map).await {
                tracing::error!(error = format!("{e:#}"), "reload after drift failed");
            }
        }
        down_changed
    }
}

impl Applier {
    /// Reads which servers HAProxy's checks have down; true when that
    /// changed, and the weights must be spread again ([`spread_over_up`]).
    pub async fn observe_health(&mut self) -> bool {
        if !self.haproxy.is_running() {
            return false;
        }
        let Ok(text) = self.haproxy.runtime_command("show servers state").await else { return false };
        self.observe_down(&runtime::parse_servers_state(&text))
    }

    fn observe_down(&mut self, actual: &BTreeMap<(String, String), runtime::ServerState>) -> bool {
        let down: Down = actual
            .iter()
            .filter(|(key, state)| state.op == runtime::OP_STOPPED && !self.draining.contains_key(*key))
            .map(|(key, _)| key.clone())
            .collect();
        if down == self.down {
            return false;
        }
        tracing::info!(down = ?down, "servers marked down by haproxy's checks changed; their versions' weight goes to the servers up");
        self.down = down;
        true
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

impl Applier {
    /// Renders `snapshot` (or, if HAProxy rejects that, no services at
    /// all), puts it in place and starts HAProxy on it.
    pub async fn start_haproxy(&mut self, snapshot: &Snapshot) -> anyhow::Result<()> {
        let ((config, map), applied) = match self.write_checked(snapshot).await {
            Ok(written) => (written, snapshot.clone()),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "the saved snapshot does not render a valid config; starting empty"
                );
                let empty = Snapshot::default();
                (self.write_checked(&empty).await?, empty)
            }
        };
        self.haproxy.start().await?;
        self.running_shape = runtime::Shape::of(&config);
        self.running = config;
        self.running_map = map;
        self.applied = applied;
        self.draining.clear();
        self.metrics().haproxy_up.set(1);
        self.shared.status.lock().unwrap().haproxy_running = true;
        Ok(())
    }

    /// Renders `snapshot` into services.map and haproxy.cfg (the map
    /// first: the config reads it) and has HAProxy check them.
    async fn write_checked(&self, snapshot: &Snapshot) -> anyhow::Result<(String, String)> {
        let config = self.renderer.render(&self.site, snapshot)?;
        let map = render::render_map(snapshot)?;
        write_atomic(&self.site.services_map(), &map).context("writing services.map")?;
        write_atomic(&self.haproxy.paths.config, &config).context("writing haproxy.cfg")?;
        self.haproxy.check(&self.haproxy.paths.config).await?;
        Ok((config, map))
    }

    /// HAProxy's master exited on its own (`status`): say so until a
    /// restart succeeds.
    pub fn haproxy_exited(&mut self, status: &str) {
        self.metrics().haproxy_exits.inc();
        self.metrics().haproxy_up.set(0);
        let mut s = self.shared.status.lock().unwrap();
        s.haproxy_running = false;
        s.haproxy_error = Some(format!("haproxy exited ({status}); restarting it"));
    }

    /// Restarts a dead HAProxy on the config in place (which always matches
    /// what ran); the HAProxy module keeps the backoff. True when it runs
    /// again.
    pub async fn restart_haproxy(&mut self) -> bool {
        match self.haproxy.restart().await {
            Ok(()) => {
                // A fresh worker holds exactly the file's servers.
                self.draining.clear();
                self.metrics().haproxy_restarts.inc();
                self.metrics().haproxy_up.set(1);
                let mut s = self.shared.status.lock().unwrap();
                s.haproxy_running = true;
                s.haproxy_error = None;
                s.draining = 0;
                tracing::info!("haproxy restarted");
                true
            }
            Err(e) => {
                let e = format!("could not restart haproxy: {e:#}");
                tracing::error!(error = %e, "retrying with backoff");
                self.metrics().haproxy_failed_starts.inc();
                let mut s = self.shared.status.lock().unwrap();
                s.haproxy_running = false;
                s.haproxy_error = Some(e.clone());
                s.last_error = Some(e);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceBackends;

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
    fn an_atomic_write_replaces_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        write_atomic(&path, "old\n").unwrap();
        write_atomic(&path, "new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        // A temp file that cannot be written (here: a directory in its
        // place, which fails for root too) leaves the file as it was.
        std::fs::create_dir(dir.path().join("haproxy.cfg.tmp")).unwrap();
        let err = write_atomic(&path, "newer\n").unwrap_err();
        assert!(err.to_string().starts_with(&format!("cannot write {}: ", path.display())), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
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

    fn weighted(index: u64, warming: bool, servers: &[(&str, &str, u32)]) -> Snapshot {
        let mut s = Snapshot { index, warming, ..Snapshot::default() };
        let backends = servers
            .iter()
            .map(|(id, version, weight)| Backend {
                id: id.parse().unwrap(),
                url: "http://h:1".parse().unwrap(),
                version: version.parse().unwrap(),
                weight: *weight,
            })
            .collect();
        s.services.insert("barker".parse().unwrap(), ServiceBackends { backends });
        s
    }

    fn weights(s: &Snapshot) -> Vec<(String, u32)> {
        s.services[&"barker".parse().unwrap()].backends.iter().map(|b| (b.id.to_string(), b.weight)).collect()
    }

    #[test]
    fn a_kept_server_shares_its_versions_weight_so_the_split_stays() {
        // 90/10 over three v1 servers and one v2; the restarted directory
        // has heard from two v1 servers and gives them v1's whole 90.
        let prev = weighted(5, false, &[("a", "v1", 30), ("b", "v1", 30), ("c", "v1", 30), ("d", "v2", 10)]);
        let next = weighted(1, true, &[("a", "v1", 45), ("b", "v1", 45), ("d", "v2", 10)]);
        let merged = keep_backends(&prev, &next);
        assert_eq!(weights(&merged), [("a".into(), 30), ("b".into(), 30), ("c".into(), 30), ("d".into(), 10)]);
        // A version the directory lists nothing of keeps its old weights;
        // a drained (0) server stays drained and takes no share.
        let prev = weighted(5, false, &[("a", "v1", 45), ("b", "v1", 0), ("d", "v2", 10)]);
        let next = weighted(1, true, &[("a", "v1", 90)]);
        let merged = keep_backends(&prev, &next);
        assert_eq!(weights(&merged), [("a".into(), 90), ("b".into(), 0), ("d".into(), 10)]);
    }

    #[test]
    fn a_server_haproxy_has_down_gives_its_versions_weight_to_the_servers_up() {
        let snapshot = weighted(5, false, &[("a", "v1", 45), ("b", "v1", 45), ("c", "v2", 5), ("d", "v2", 5)]);
        let down = |ids: &[&str]| -> Down { ids.iter().map(|id| ("svc_barker".to_string(), id.to_string())).collect() };
        assert_eq!(*spread_over_up(&snapshot, &Down::new()), snapshot, "nothing down: as the directory says");
        // v1 keeps its 90: b alone carries it; a keeps its weight, so it
        // takes its share again the moment HAProxy has it up.
        assert_eq!(
            weights(&spread_over_up(&snapshot, &down(&["a"]))),
            [("a".into(), 45), ("b".into(), 90), ("c".into(), 5), ("d".into(), 5)]
        );
        // A version with nothing up is left alone; another service's
        // server of the same name is not this one.
        assert_eq!(*spread_over_up(&snapshot, &down(&["c", "d"])), snapshot);
        let elsewhere: Down = [("svc_other".to_string(), "a".to_string())].into();
        assert_eq!(*spread_over_up(&snapshot, &elsewhere), snapshot);
    }
}
