//! The directory: live instances from heartbeats, merged into numbered
//! snapshots that sherlocks follow with blocking queries.

pub mod api;
pub mod merge;
pub mod reconcile;
pub mod registry;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::model::{Heartbeat, InstanceId, Snapshot};
use crate::routes::RouteSet;
use reconcile::{Rejected, RepoConfig, RoutesStatus, Trigger};
use registry::{Change, Registry};

/// How long a silent sherlock stays listed in `/v1/status`.
const SHERLOCK_FORGET: Duration = Duration::from_secs(600);
/// The directory's timer: deferred publishes wait at most this long.
const TICK: Duration = Duration::from_millis(10);
/// How often the registry is scanned for expired instances.
const EXPIRY_SCAN: Duration = Duration::from_millis(100);
/// Publishes are at least this far apart...
const MIN_PUBLISH_INTERVAL: Duration = Duration::from_millis(10);
/// ...and at least this many times their own cost apart, so that a burst
/// (10,000 watsons re-registering with a restarted directory) costs at most
/// a quarter of a core in merges instead of one full merge per heartbeat.
const PUBLISH_COST_FACTOR: u32 = 4;

/// Validated settings of one directory.
#[derive(Debug, Clone)]
pub struct Config {
    /// The name it reports (`-n services`).
    pub name: String,
    /// The address it advertises (`-a //services/directory`), for status only.
    pub address: Option<String>,
    /// Where the HTTP API listens.
    pub listen: SocketAddr,
    /// Where it keeps its state (the routes mirror).
    pub state_dir: PathBuf,
    /// The routes repo, if desired state comes from git.
    pub repo: Option<RepoConfig>,
    /// The largest TTL a heartbeat may ask for; also how long a fresh
    /// directory marks its snapshots `warming`.
    pub max_ttl: Duration,
}

/// What the directory knows of a sherlock that follows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SherlockSeen {
    /// The snapshot index it reported as applied.
    pub applied: u64,
    /// Its address as seen from here.
    pub peer: String,
    /// When it last asked for a snapshot.
    #[serde(skip)]
    pub last_seen: Instant,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub heartbeats: AtomicU64,
    pub deregistrations: AtomicU64,
    pub expiries: AtomicU64,
    pub snapshots_published: AtomicU64,
    pub bad_requests: AtomicU64,
    pub reconciles: AtomicU64,
    pub rejected_commits: AtomicU64,
}

/// Mutable state, behind one std `Mutex`: every critical section is short
/// and never awaits, so a tokio mutex would only add cost.
#[derive(Debug, Default)]
struct Inner {
    registry: Registry,
    sherlocks: HashMap<String, SherlockSeen>,
    /// The routes of the commit in force.
    routes: RouteSet,
    /// Where those routes came from, and any rejected commit or fetch error.
    routes_status: RoutesStatus,
    /// A change is waiting to be published (see `changed`).
    dirty: bool,
    /// When the last publish ran, and how long it took.
    last_publish: Option<(Instant, Duration)>,
    /// When the registry is next scanned for expired instances.
    next_expiry_scan: Option<Instant>,
}

/// One running directory, shared by the HTTP handlers and the expiry loop.
pub struct Directory {
    pub config: Config,
    started: Instant,
    started_at: SystemTime,
    inner: Mutex<Inner>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    pub metrics: Metrics,
    /// Cancelled at shutdown so that blocking queries return at once.
    shutdown: CancellationToken,
    /// Wakes the reconciler (webhook, file watch); None without a repo.
    reconcile_tx: Option<mpsc::Sender<Trigger>>,
}

impl Directory {
    /// A directory, and the receiving end of its reconcile triggers when it
    /// has a repo (for `reconcile::run`).
    pub fn new(config: Config, shutdown: CancellationToken) -> (Arc<Directory>, Option<mpsc::Receiver<Trigger>>) {
        let first = Snapshot { index: 1, warming: !config.max_ttl.is_zero(), ..Snapshot::default() };
        // Capacity 1: one pending trigger covers any number of wake-ups.
        let (tx, rx) = match &config.repo {
            Some(_) => {
                let (tx, rx) = mpsc::channel(1);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let routes_status = config
            .repo
            .as_ref()
            .map(|r| RoutesStatus { repo: r.url.clone(), branch: r.branch.clone(), ..RoutesStatus::default() })
            .unwrap_or_default();
        let directory = Arc::new(Directory {
            config,
            started: Instant::now(),
            started_at: SystemTime::now(),
            inner: Mutex::new(Inner { routes_status, ..Inner::default() }),
            snapshots: watch::Sender::new(Arc::new(first)),
            metrics: Metrics::default(),
            shutdown,
            reconcile_tx: tx,
        });
        (directory, rx)
    }

    pub fn reconcile_sender(&self) -> Option<mpsc::Sender<Trigger>> {
        self.reconcile_tx.clone()
    }

    /// Puts a validated routes commit in force.
    pub fn set_routes(&self, commit: String, summary: String, routes: RouteSet) {
        let mut inner = self.inner.lock().unwrap();
        inner.routes = routes;
        let status = &mut inner.routes_status;
        status.commit = Some(commit);
        status.summary = Some(summary);
        status.fetched_at = Some(reconcile::now_rfc3339());
        status.rejected = None;
        status.error = None;
        self.changed(&mut inner);
    }

    /// Records a successful fetch that changed nothing in force: the same
    /// commit again, or a commit rejected by validation.
    pub fn routes_fetched(&self, rejected: Option<Rejected>) {
        let mut inner = self.inner.lock().unwrap();
        let status = &mut inner.routes_status;
        status.fetched_at = Some(reconcile::now_rfc3339());
        status.error = None;
        if let Some(rejected) = rejected {
            self.metrics.rejected_commits.fetch_add(1, Ordering::Relaxed);
            status.rejected = Some(rejected);
        }
    }

    /// Records a failed fetch; the commit in force stays.
    pub fn routes_error(&self, error: String) {
        self.inner.lock().unwrap().routes_status.error = Some(error);
    }

    /// The snapshot, the routes it was built from and the repo state, read
    /// together: publishing happens under the same lock, so they agree.
    pub fn in_force(&self) -> (Arc<Snapshot>, RouteSet, RoutesStatus) {
        let inner = self.inner.lock().unwrap();
        (self.snapshot(), inner.routes.clone(), inner.routes_status.clone())
    }

    pub fn routes_status(&self) -> RoutesStatus {
        self.inner.lock().unwrap().routes_status.clone()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.subscribe()
    }

    fn warming(&self) -> bool {
        self.started.elapsed() < self.config.max_ttl
    }

    pub fn heartbeat(&self, id: InstanceId, heartbeat: Heartbeat) {
        self.metrics.heartbeats.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.inner.lock().unwrap();
        if inner.registry.heartbeat(id.clone(), heartbeat, Instant::now()) == Change::Membership {
            tracing::info!(instance = %id, "registered");
            self.changed(&mut inner);
        }
    }

    /// Deregisters an instance; true when it was registered.
    pub fn deregister(&self, id: &InstanceId) -> bool {
        let mut inner = self.inner.lock().unwrap();
        let removed = inner.registry.remove(id);
        if removed {
            self.metrics.deregistrations.fetch_add(1, Ordering::Relaxed);
            tracing::info!(instance = %id, "deregistered");
            self.changed(&mut inner);
        }
        removed
    }

    /// Expires instances whose TTL has passed, ends warming when due, and
    /// publishes a deferred change once its interval has passed.
    fn tick(&self) {
        let mut inner = self.inner.lock().unwrap();
        let now = Instant::now();
        if inner.next_expiry_scan.is_none_or(|t| now >= t) {
            inner.next_expiry_scan = Some(now + EXPIRY_SCAN);
            let expired = inner.registry.expire(now);
            for (id, entry) in &expired {
                tracing::warn!(instance = %id, service = %entry.heartbeat.service, "expired: no heartbeat within its ttl");
            }
            self.metrics.expiries.fetch_add(expired.len() as u64, Ordering::Relaxed);
            // A sherlock that has not asked for ten minutes is gone, not lagging.
            inner.sherlocks.retain(|_, s| s.last_seen.elapsed() < SHERLOCK_FORGET);
            let warming_ended = self.snapshots.borrow().warming && !self.warming();
            inner.dirty |= !expired.is_empty() || warming_ended;
        }
        if inner.dirty && self.may_publish(&inner) {
            self.publish(&mut inner);
        }
    }

    /// Whether a publish now keeps publishes far enough apart.
    fn may_publish(&self, inner: &Inner) -> bool {
        inner.last_publish.is_none_or(|(at, cost)| at.elapsed() >= MIN_PUBLISH_INTERVAL.max(cost * PUBLISH_COST_FACTOR))
    }

    /// Something that shapes the snapshot changed: publish at once after a
    /// quiet spell, else leave it to the timer, so bursts become one publish.
    fn changed(&self, inner: &mut Inner) {
        inner.dirty = true;
        if self.may_publish(inner) {
            self.publish(inner);
        }
    }

    /// Rebuilds the snapshot and publishes it under a new index if its content
    /// changed. Called with the lock held, so indexes follow mutations in order.
    fn publish(&self, inner: &mut Inner) {
        let started = Instant::now();
        inner.dirty = false;
        let merged = merge::merge(inner.registry.iter().map(|(id, e)| (id, &e.heartbeat)), &inner.routes);
        let warming = self.warming();
        let commit = inner.routes_status.commit.clone();
        let current = self.snapshot();
        if current.services == merged.services
            && current.clients == merged.clients
            && current.warnings == merged.warnings
            && current.warming == warming
            && current.commit == commit
        {
            inner.last_publish = Some((started, started.elapsed()));
            return;
        }
        let next = Snapshot {
            index: current.index + 1,
            commit,
            warming,
            services: merged.services,
            clients: merged.clients,
            warnings: merged.warnings,
        };
        tracing::info!(index = next.index, services = next.services.len(), warming, "snapshot published");
        self.metrics.snapshots_published.fetch_add(1, Ordering::Relaxed);
        self.snapshots.send_replace(Arc::new(next));
        inner.last_publish = Some((started, started.elapsed()));
    }

    /// Records that a sherlock asked for a snapshot, having applied `applied`.
    pub fn saw_sherlock(&self, name: String, applied: u64, peer: SocketAddr) {
        let mut inner = self.inner.lock().unwrap();
        inner.sherlocks.insert(name, SherlockSeen { applied, peer: peer.to_string(), last_seen: Instant::now() });
    }

    /// The registry as `dw route list` and the status page show it.
    pub fn instances(&self) -> Vec<api::InstanceStatus> {
        let inner = self.inner.lock().unwrap();
        let now = Instant::now();
        let mut list: Vec<api::InstanceStatus> = inner
            .registry
            .iter()
            .map(|(id, e)| api::InstanceStatus {
                id: id.clone(),
                service: e.heartbeat.service.clone(),
                version: e.heartbeat.version.clone(),
                url: e.heartbeat.url.clone(),
                ttl_ms: e.heartbeat.ttl_ms,
                last_heartbeat_ms: now.duration_since(e.last_seen).as_millis() as u64,
            })
            .collect();
        list.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
        list
    }

    pub fn instance_count(&self) -> usize {
        self.inner.lock().unwrap().registry.len()
    }

    fn sherlocks(&self) -> Vec<api::SherlockStatus> {
        let inner = self.inner.lock().unwrap();
        let mut list: Vec<api::SherlockStatus> = inner
            .sherlocks
            .iter()
            .map(|(name, s)| api::SherlockStatus {
                name: name.clone(),
                applied: s.applied,
                peer: s.peer.clone(),
                last_seen_ms: s.last_seen.elapsed().as_millis() as u64,
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }
}

/// Runs a directory until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating --state-dir {}", config.state_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding --listen {}", config.listen))?;
    let (directory, triggers) = Directory::new(config, shutdown.clone());
    let reconciler = match (directory.config.repo.clone(), triggers) {
        (Some(repo), Some(triggers)) => {
            let mirror = directory.config.state_dir.join("routes.git");
            tracing::info!(repo = %repo.url, branch = %repo.branch, poll = ?repo.poll, "following the routes repo");
            Some(tokio::spawn(reconcile::run(directory.clone(), repo, mirror, triggers, shutdown.clone())))
        }
        _ => None,
    };
    tracing::info!(addr = %listener.local_addr()?, name = %directory.config.name, "directory listening");

    let ticker = {
        let directory = directory.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // Expiry scans every 100 ms (10,000 entries cost well under a
            // millisecond); deferred publishes are checked every 10 ms.
            let mut every = tokio::time::interval(TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = every.tick() => directory.tick(),
                }
            }
        })
    };

    let app = api::app(directory);
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("serving the HTTP API")?;
    ticker.await.ok();
    if let Some(r) = reconciler {
        r.await.ok();
    }
    Ok(())
}
