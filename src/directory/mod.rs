//! The directory: live instances from heartbeats, merged into numbered
//! snapshots that sherlocks follow with blocking queries.

pub mod answers;
pub mod api;
pub mod auth;
pub mod config;
pub mod limits;
pub mod merge;
pub mod publisher;
pub mod reconcile;
pub mod registry;
pub mod serve;
pub mod status_page;

use std::collections::HashMap;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

pub use config::{AuthMode, Config, RepoConfig};

use crate::metrics::{self, Counter, IntGauge, Seconds};
use crate::model::{ClientName, Heartbeat, InstanceId, ServiceName, Snapshot, SnapshotId};
use crate::protocol::{InstanceStatus, Rejected, RoutesStatus, SherlockStatus, WriteAck};
use crate::routes::RouteSet;
use answers::Published;
use auth::Auth;
use publisher::Schedule;
use reconcile::Trigger;
use registry::{Change, Registry};

/// How long a silent sherlock stays listed in `/v1/status`.
const SHERLOCK_FORGET: Duration = Duration::from_secs(600);

/// A write refused because a limit is reached (a 429); the message names
/// the limit's key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Full(pub String);

/// What the directory knows of a sherlock that follows it.
#[derive(Debug, Clone)]
pub struct SherlockSeen {
    /// The client whose routes it follows, when it said.
    pub client: Option<ClientName>,
    /// The snapshot it reported as applied.
    pub applied: SnapshotId,
    /// Its address as seen from here.
    pub peer: String,
    /// When it last asked for a snapshot.
    pub last_seen: Instant,
}

/// What the directory counts and times for `/metrics`; README.md
/// ("Metrics") lists them with their Prometheus names.
#[derive(Debug)]
pub struct Metrics {
    pub heartbeats: Counter,
    pub deregistrations: Counter,
    pub expiries: Counter,
    pub snapshots_published: Counter,
    pub bad_requests: Counter,
    pub reconciles: Counter,
    pub rejected_commits: Counter,
    /// Refusals for a missing or wrong token (401) or role (403); also
    /// counted in `bad_requests`.
    pub auth_refusals: Counter,
    /// Connections open now (kept by the serving layer).
    pub connections_open: IntGauge,
    /// Connections refused at `limits.max_connections`.
    pub connections_refused: Counter,
    /// TLS handshakes that failed (a client's untrusted or missing
    /// certificate, a wrong CA) or were not done in time.
    pub tls_handshake_failures: Counter,
    /// Set at every scrape: a gauge read from the state it reports.
    snapshot_index: IntGauge,
    instances: IntGauge,
    sherlocks: IntGauge,
    /// One fetch and validation of the routes repo.
    pub reconcile: Seconds,
    /// One `PUT /v1/instances/{id}`, from its decoded body to its answer.
    pub heartbeat: Seconds,
    /// From publishing a snapshot to a sherlock reporting it applied.
    propagation: Seconds,
    registry: metrics::Metrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = metrics::Metrics::default();
        Metrics {
            heartbeats: r.counter("dstack_directory_heartbeats", "Heartbeats accepted."),
            deregistrations: r.counter("dstack_directory_deregistrations", "Instances deregistered by their watson."),
            expiries: r.counter("dstack_directory_expiries", "Instances expired for lack of heartbeats."),
            snapshots_published: r.counter("dstack_directory_snapshots_published", "Snapshots published."),
            bad_requests: r.counter("dstack_directory_bad_requests", "Requests refused with a 4xx."),
            auth_refusals: r.counter(
                "dstack_directory_auth_refusals",
                "Requests refused for a missing or invalid token (401) or one outside its role (403).",
            ),
            reconciles: r.counter("dstack_directory_reconciles", "Reconciles of the routes repo."),
            rejected_commits: r.counter("dstack_directory_rejected_commits", "Routes commits rejected by validation."),
            snapshot_index: r.gauge("dstack_directory_snapshot_index", "Index of the snapshot served."),
            instances: r.gauge("dstack_directory_instances", "Live instances."),
            sherlocks: r.gauge("dstack_directory_sherlocks", "Sherlocks that asked for a snapshot in the last 10 minutes."),
            connections_open: r.gauge("dstack_directory_connections_open", "Connections open now."),
            connections_refused: r.counter(
                "dstack_directory_connections_refused",
                "Connections answered 503 at limits.max_connections.",
            ),
            tls_handshake_failures: r.counter(
                "dstack_directory_tls_handshake_failures",
                "TLS handshakes that failed or were not done within limits.header_read_timeout.",
            ),
            reconcile: r.seconds(
                "dstack_directory_reconcile",
                "Time to fetch and validate the routes repo, failed attempts included.",
            ),
            heartbeat: r.seconds(
                "dstack_directory_heartbeat",
                "Time to handle a heartbeat, from its decoded body to the answer (a new instance's DNS check included).",
            ),
            propagation: r.seconds(
                "dstack_directory_snapshot_propagation",
                "Time from publishing a snapshot to a sherlock reporting it applied (its next blocking query).",
            ),
            registry: r,
        }
    }
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
    /// The publisher's deadlines and whether a change waits.
    schedule: Schedule,
    /// A commit and its history's length; published with the commit in
    /// force when they match.
    commit_count: Option<(String, u64)>,
    /// When the newest snapshots were published (index, time), oldest
    /// first, for `dstack_directory_snapshot_propagation_seconds`.
    published: VecDeque<(u64, Instant)>,
}

/// Publish times kept: a sherlock reporting an older index is not timed.
const PUBLISHED_KEPT: usize = 64;

/// One running directory, shared by the HTTP handlers, the publisher and
/// the reconciler. Handlers only change the registry and wake the
/// publisher; only the publisher builds and numbers snapshots, so indexes
/// follow changes in order and no request pays for a merge.
pub struct Directory {
    pub config: Config,
    /// This run's identity, carried by every snapshot (see [`Snapshot::epoch`]).
    epoch: u64,
    started_at: SystemTime,
    inner: Mutex<Inner>,
    /// The snapshot in force, with the answers encoded from it so far.
    snapshots: watch::Sender<Arc<Published>>,
    pub metrics: Metrics,
    /// Who may do what: tokens, roles, the webhook secret.
    pub auth: Auth,
    /// Cancelled at shutdown so that blocking queries return at once.
    shutdown: CancellationToken,
    /// Wakes the reconciler (webhook, file watch); None without a repo.
    reconcile_tx: Option<mpsc::Sender<Trigger>>,
    /// Wakes the publisher: a change is pending.
    wake: Notify,
    /// Blocking queries waiting now (bounded by `limits.waiting_queries`).
    waiting: Arc<AtomicUsize>,
}

/// A waiting query's place; dropping it frees the place.
pub struct WaitSlot(Arc<AtomicUsize>);

impl Drop for WaitSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Directory {
    /// A directory, and the receiving end of its reconcile triggers when it
    /// has a repo (for `reconcile::run`).
    pub fn new(config: Config, shutdown: CancellationToken) -> (Arc<Directory>, Option<mpsc::Receiver<Trigger>>) {
        Self::new_with_auth(config, Auth::off(), shutdown)
    }

    /// A directory whose callers must satisfy `auth`.
    pub fn new_with_auth(
        config: Config,
        auth: Auth,
        shutdown: CancellationToken,
    ) -> (Arc<Directory>, Option<mpsc::Receiver<Trigger>>) {
        let started_at = SystemTime::now();
        // Microseconds since 1970: larger on every restart, and exact in JSON.
        let epoch = started_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(1);
        let warming = !config.max_ttl.is_zero();
        let first = Snapshot { epoch, index: 1, warming, ..Snapshot::default() };
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
            .map(|r| RoutesStatus {
                repo: r.url.to_string(),
                branch: r.branch.clone(),
                stale: Some(reconcile::NOT_FETCHED.to_string()),
                ..RoutesStatus::default()
            })
            .unwrap_or_default();
        let schedule =
            Schedule { warming_until: warming.then(|| Instant::now() + config.max_ttl), ..Schedule::default() };
        let directory = Arc::new(Directory {
            config,
            epoch,
            started_at,
            inner: Mutex::new(Inner { routes_status, schedule, ..Inner::default() }),
            snapshots: watch::Sender::new(Arc::new(Published::new(first))),
            metrics: Metrics::default(),
            auth,
            shutdown,
            reconcile_tx: tx,
            wake: Notify::new(),
            waiting: Arc::new(AtomicUsize::new(0)),
        });
        (directory, rx)
    }

    pub fn reconcile_sender(&self) -> Option<mpsc::Sender<Trigger>> {
        self.reconcile_tx.clone()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn uptime(&self) -> Duration {
        self.started_at.elapsed().unwrap_or_default()
    }

    /// A place for one more waiting blocking query, or a refusal naming
    /// the limit.
    pub fn wait_slot(&self) -> Result<WaitSlot, Full> {
        let limit = self.config.limits.waiting_queries;
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= limit {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(Full(format!(
                "{limit} blocking queries are waiting already (limits.waiting_queries); retry later"
            )));
        }
        Ok(WaitSlot(self.waiting.clone()))
    }

    /// Whether a heartbeat only refreshes an instance as it is registered
    /// (same service, version and URL): such a heartbeat needs no checks of
    /// where it points.
    pub fn is_refresh(&self, id: &InstanceId, heartbeat: &Heartbeat) -> bool {
        let inner = self.inner.lock().unwrap();
        inner.registry.get(id).is_some_and(|e| {
            e.heartbeat.service == heartbeat.service
                && e.heartbeat.version == heartbeat.version
                && e.heartbeat.url == heartbeat.url
        })
    }

    /// Marks a change for the publisher and wakes it.
    fn changed(&self, inner: &mut Inner) {
        inner.schedule.pending = true;
        self.wake.notify_one();
    }

    /// The first snapshot that will hold everything changed so far: the
    /// next one while a change is pending, else the one served.
    fn ack(&self, inner: &Inner, removed: Option<bool>) -> WriteAck {
        let served = self.snapshots.borrow().index;
        WriteAck { removed, epoch: self.epoch, index: served + u64::from(inner.schedule.pending), max_ttl_ms: None }
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
        status.stale = None;
        self.changed(&mut inner);
    }

    /// Puts back in force, before any fetch, the commit a previous run
    /// accepted (read from the mirror), and publishes it before anyone
    /// can ask: `stale` says it has not been fetched since start.
    pub fn restore_routes(&self, commit: String, summary: String, routes: RouteSet) {
        let mut inner = self.inner.lock().unwrap();
        inner.routes = routes;
        let status = &mut inner.routes_status;
        status.commit = Some(commit);
        status.summary = Some(summary);
        status.stale = Some(format!("{}: serving the commit in force before the restart", reconcile::NOT_FETCHED));
        self.publish(&mut inner, Instant::now());
    }

    /// Records that a fetch started (`Some(RFC 3339)`) or ended (None).
    pub fn fetch_started(&self, since: Option<String>) {
        self.inner.lock().unwrap().routes_status.fetching_since = since;
    }

    /// Records how many commits `commit`'s history holds; it reaches the
    /// snapshots while `commit` is in force.
    pub fn set_commit_count(&self, commit: &str, count: u64) {
        let mut inner = self.inner.lock().unwrap();
        let in_force = inner.routes_status.commit.as_deref() == Some(commit);
        let published = self.snapshots.borrow().commit_count;
        inner.commit_count = Some((commit.to_string(), count));
        if in_force && published != Some(count) {
            self.changed(&mut inner);
        }
    }

    /// Records a successful fetch that changed nothing in force: the commit
    /// in force again (`head_in_force`: any rejected commit is no longer
    /// the head, as after a reset or a force-push), the same rejected
    /// commit, or a newly rejected one.
    pub fn routes_fetched(&self, rejected: Option<Rejected>, head_in_force: bool) {
        let mut inner = self.inner.lock().unwrap();
        let status = &mut inner.routes_status;
        status.fetched_at = Some(reconcile::now_rfc3339());
        status.error = None;
        status.stale = None;
        if head_in_force {
            status.rejected = None;
        }
        if let Some(rejected) = rejected {
            self.metrics.rejected_commits.inc();
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
        self.snapshots.borrow().snapshot.clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.snapshots.subscribe()
    }

    pub fn heartbeat(&self, id: InstanceId, heartbeat: Heartbeat) -> Result<WriteAck, Full> {
        self.heartbeat_if(id, heartbeat, |_| Ok::<(), Full>(()))
    }

    /// A heartbeat from a caller who may touch some services only: refused
    /// by `may` when the id is registered for another service (so a token
    /// for `emitter` cannot take over a `barker` instance by its id).
    /// Checked under the registry's lock, so no write slips in between.
    pub fn heartbeat_if<E: From<Full>>(
        &self,
        id: InstanceId,
        heartbeat: Heartbeat,
        may: impl Fn(&ServiceName) -> Result<(), E>,
    ) -> Result<WriteAck, E> {
        let now = Instant::now();
        let expires = now + Duration::from_millis(heartbeat.ttl_ms);
        let mut inner = self.inner.lock().unwrap();
        let held = inner.registry.get(&id).map(|e| e.heartbeat.service.clone());
        if let Some(held) = &held {
            may(held)?;
        }
        // A new instance, or one moving to another service, must fit.
        if held.as_ref() != Some(&heartbeat.service) {
            let limits = &self.config.limits;
            if held.is_none() && inner.registry.len() >= limits.instances {
                return Err(Full(format!(
                    "the directory holds {} instances, its limit (limits.instances); none is added until one leaves",
                    limits.instances
                ))
                .into());
            }
            let count = inner.registry.count_of(&heartbeat.service);
            if count == 0 && inner.registry.service_count() >= limits.services {
                return Err(Full(format!(
                    "the directory holds {} services, its limit (limits.services); {} is not added",
                    limits.services, heartbeat.service
                ))
                .into());
            }
            if count >= limits.instances_per_service {
                return Err(Full(format!(
                    "{} has {} instances, the limit for one service (limits.instances_per_service)",
                    heartbeat.service, limits.instances_per_service
                ))
                .into());
            }
        }
        self.metrics.heartbeats.inc();
        if inner.registry.heartbeat(id.clone(), heartbeat, now) == Change::Membership {
            tracing::info!(instance = %id, "registered");
            inner.schedule.expiry_at_most(expires);
            self.changed(&mut inner);
        }
        Ok(self.ack(&inner, None))
    }

    /// Deregisters an instance; the answer says whether it was registered.
    pub fn deregister(&self, id: &InstanceId) -> WriteAck {
        self.deregister_if(id, |_| Ok::<(), ()>(())).expect("nothing refuses")
    }

    /// Deregisters an instance if `may` allows its service.
    pub fn deregister_if<E>(
        &self,
        id: &InstanceId,
        may: impl Fn(&ServiceName) -> Result<(), E>,
    ) -> Result<WriteAck, E> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(held) = inner.registry.get(id) {
            may(&held.heartbeat.service)?;
        }
        let removed = inner.registry.remove(id);
        if removed {
            self.metrics.deregistrations.inc();
            tracing::info!(instance = %id, "deregistered");
            self.changed(&mut inner);
        }
        Ok(self.ack(&inner, Some(removed)))
    }

    /// The publisher's one pass at `now`: expire instances, end warming,
    /// publish a pending change when a burst allows. Returns when to run
    /// again (None: on the next change) and whether a change may wake it
    /// sooner.
    fn step(&self, now: Instant) -> (Option<Instant>, bool) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(stall) = inner.schedule.stalled(now) {
            // Heartbeats sent meanwhile wait in the socket queue, and are
            // read only now: expiring on the clock alone would empty every
            // sherlock's backends at once after a pause.
            tracing::warn!(
                ?stall,
                "the directory did not run for a while; every instance's ttl is extended by as much"
            );
            inner.registry.postpone(stall);
            inner.schedule.next_expiry = inner.registry.next_expiry();
        }
        let due = inner.schedule.due(now);
        if due.expire {
            let expired = inner.registry.expire(now);
            for (id, entry) in &expired {
                tracing::warn!(instance = %id, service = %entry.heartbeat.service, "expired: no heartbeat within its ttl");
            }
            self.metrics.expiries.inc_by(expired.len() as u64);
            inner.schedule.pending |= !expired.is_empty();
            inner.schedule.next_expiry = inner.registry.next_expiry();
            // A sherlock that has not asked for ten minutes is gone, not lagging.
            inner.sherlocks.retain(|_, s| now.saturating_duration_since(s.last_seen) < SHERLOCK_FORGET);
        }
        if due.end_warming {
            inner.schedule.warming_until = None;
            inner.schedule.pending = true;
        }
        if inner.schedule.due(now).publish {
            self.publish(&mut inner, now);
        }
        (inner.schedule.next_wake(), inner.schedule.listens_for_changes())
    }

    /// Builds the snapshot and publishes it under the next index. Called
    /// with the lock held, by the publisher only.
    fn publish(&self, inner: &mut Inner, now: Instant) {
        let started = Instant::now();
        let merged = merge::merge(inner.registry.iter().map(|(id, e)| (id, &e.heartbeat)), &inner.routes);
        let current = self.snapshot();
        let next = Snapshot {
            epoch: self.epoch,
            index: current.index + 1,
            commit: inner.routes_status.commit.clone(),
            commit_count: inner
                .commit_count
                .as_ref()
                .filter(|(commit, _)| inner.routes_status.commit.as_ref() == Some(commit))
                .map(|(_, count)| *count),
            warming: inner.schedule.warming_until.is_some(),
            services: merged.services,
            clients: merged.clients,
            warnings: merged.warnings,
        };
        tracing::info!(
            index = next.index,
            services = next.services.len(),
            warming = next.warming,
            "snapshot published"
        );
        self.metrics.snapshots_published.inc();
        if inner.published.len() == PUBLISHED_KEPT {
            inner.published.pop_front();
        }
        inner.published.push_back((next.index, Instant::now()));
        self.snapshots.send_replace(Arc::new(Published::new(next)));
        inner.schedule.published(now, started.elapsed());
    }

    /// Records that a sherlock asked for a snapshot, having applied `applied`.
    pub fn saw_sherlock(&self, name: String, client: Option<ClientName>, applied: SnapshotId, peer: SocketAddr) {
        let mut inner = self.inner.lock().unwrap();
        // At the limit, the longest silent sherlock is forgotten for a new one.
        if inner.sherlocks.len() >= self.config.limits.sherlocks && !inner.sherlocks.contains_key(&name) {
            let oldest = inner.sherlocks.iter().min_by_key(|(_, s)| s.last_seen).map(|(n, _)| n.clone());
            if let Some(oldest) = oldest {
                inner.sherlocks.remove(&oldest);
            }
        }
        let now = Instant::now();
        // Timed once, when a sherlock seen before reports a newer snapshot of
        // this run: a new or restarted one reports what it applied long ago.
        let before = inner.sherlocks.get(&name).map(|s| s.applied);
        if applied.epoch == self.epoch && before.is_some_and(|b| b.epoch == applied.epoch && b.index < applied.index) {
            if let Some((_, at)) = inner.published.iter().find(|(index, _)| *index == applied.index) {
                self.metrics.propagation.observe(now.saturating_duration_since(*at));
            }
        }
        inner.sherlocks.insert(name, SherlockSeen { client, applied, peer: peer.to_string(), last_seen: now });
    }

    /// The registry as `dw route list` and the status page show it.
    pub fn instances(&self) -> Vec<InstanceStatus> {
        let inner = self.inner.lock().unwrap();
        let now = Instant::now();
        let mut list: Vec<InstanceStatus> = inner
            .registry
            .iter()
            .map(|(id, e)| InstanceStatus {
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

    /// The `/metrics` answer for this `Accept` header: (content type, body).
    pub fn render_metrics(&self, accept: Option<&str>) -> (&'static str, String) {
        let m = &self.metrics;
        m.snapshot_index.set(self.snapshot().index as i64);
        {
            let inner = self.inner.lock().unwrap();
            m.instances.set(inner.registry.len() as i64);
            m.sherlocks.set(inner.sherlocks.len() as i64);
        }
        m.registry.encode(accept)
    }

    pub fn instance_count(&self) -> usize {
        self.inner.lock().unwrap().registry.len()
    }

    /// The sherlocks heard from in the last ten minutes.
    pub fn sherlocks(&self) -> Vec<SherlockStatus> {
        let inner = self.inner.lock().unwrap();
        let mut list: Vec<SherlockStatus> = inner
            .sherlocks
            .iter()
            .filter(|(_, s)| s.last_seen.elapsed() < SHERLOCK_FORGET)
            .map(|(name, s)| SherlockStatus {
                name: name.clone(),
                client: s.client.as_ref().map(ToString::to_string),
                applied_epoch: s.applied.epoch,
                applied: s.applied.index,
                peer: s.peer.clone(),
                last_seen_ms: s.last_seen.elapsed().as_millis() as u64,
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }
}

/// The publisher task: one pass, then sleep until the pass's deadline or,
/// when it listens, the next change.
pub(crate) async fn publish_loop(directory: Arc<Directory>, shutdown: CancellationToken) {
    // Fed after a pass: a directory stuck on its state lock stops feeding it.
    let mut watchdog = crate::systemd::Watchdog::from_env();
    loop {
        let (wake_at, listens) = directory.step(Instant::now());
        let deadline = async {
            match wake_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = deadline => {}
            _ = directory.wake.notified(), if listens => {}
            _ = watchdog.tick() => crate::systemd::watchdog(),
        }
    }
}

/// Runs a directory until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context;
    // The routes mirror (and the cluster token) decide what traffic does:
    // no one else may write them.
    crate::private_dir::ensure(&config.state_dir, "--state-dir")?;
    let auth = setup_auth(&config)?;
    let tls = match config.tls.clone() {
        Some(files) => Some(Arc::new(crate::tls::ServerTls::load(files).context("serving HTTPS")?)),
        None => None,
    };
    // Installed before serving: SIGHUP's default action would end the process.
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding --listen {}", config.listen))?;
    let (directory, triggers) = Directory::new_with_auth(config, auth, shutdown.clone());
    let reconciler = match (directory.config.repo.clone(), triggers) {
        (Some(repo), Some(triggers)) => {
            let mirror = directory.config.state_dir.join("routes.git");
            crate::gitsync::configure_libgit2(repo.connect_timeout, repo.read_timeout)?;
            let lock = reconcile::warm_start(&directory, &repo, &mirror)?;
            tracing::info!(repo = %repo.url, branch = %repo.branch, poll = ?repo.poll, fetch_timeout = ?repo.fetch_timeout, "following the routes repo");
            let run = reconcile::run(directory.clone(), repo, mirror, triggers, shutdown.clone());
            Some(tokio::spawn(async move {
                run.await;
                drop(lock);
            }))
        }
        _ => None,
    };
    tracing::info!(
        addr = %listener.local_addr()?,
        name = %directory.config.name,
        tls = tls.is_some(),
        client_certificates = tls.as_ref().is_some_and(|t| t.files().client_ca.is_some()),
        max_connections = directory.config.limits.max_connections,
        header_read_timeout = ?directory.config.limits.header_read_timeout.0,
        "directory listening"
    );

    let publisher = tokio::spawn(publish_loop(directory.clone(), shutdown.clone()));
    tokio::spawn(notify_ready(directory.clone(), shutdown.clone()));
    let reloader = tokio::spawn({
        let (directory, shutdown, tls) = (directory.clone(), shutdown.clone(), tls.clone());
        async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    got = hangups.recv() => if got.is_none() { return },
                }
                match directory.auth.reload() {
                    Ok(what) => tracing::info!(reloaded = %what, "SIGHUP: auth reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: auth reload failed; the tokens in force stay"),
                }
                // Certificate rotation: new connections get the new files.
                match tls.as_ref().map(|t| t.reload()) {
                    Some(Ok(())) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "SIGHUP: TLS reload failed; the certificate in force stays")
                    }
                    None => {}
                }
            }
        }
    });

    let app = api::app(directory.clone());
    serve::serve(listener, app, directory, tls, shutdown).await;
    publisher.await.ok();
    reloader.await.ok();
    if let Some(r) = reconciler {
        r.await.ok();
    }
    Ok(())
}

/// Tells systemd the directory serves (it listens already): at once with no
/// repo or with the commit in force restored from the state dir, else once
/// the first fetch has ended, accepted, rejected or failed, so a remote that
/// is down does not hold the start (the status line says why).
async fn notify_ready(directory: Arc<Directory>, shutdown: CancellationToken) {
    if !crate::systemd::enabled() {
        return;
    }
    let listen = directory.config.listen;
    let status = loop {
        if directory.config.repo.is_none() {
            break format!("serving on {listen}; no routes repo: equal traffic to every instance");
        }
        let routes = directory.routes_status();
        match (&routes.commit, &routes.error, &routes.rejected) {
            (Some(commit), _, _) => break format!("serving on {listen}; routes commit {commit}"),
            (None, Some(error), _) => break format!("serving on {listen}; no routes yet, the fetch failed: {error}"),
            (None, None, Some(_)) => break format!("serving on {listen}; no routes yet, the head commit was rejected"),
            (None, None, None) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
        }
    };
    crate::systemd::ready(&status);
}

/// The directory's keys from its settings, logged (never a token): an auth
/// file, the cluster token (made on first start), or none.
fn setup_auth(config: &Config) -> anyhow::Result<Auth> {
    use anyhow::Context;
    let auth = match &config.auth {
        AuthMode::File(path) => {
            let auth = Auth::from_file(path)?;
            tracing::info!(auth_file = %path.display(), "tokens and roles from the auth file; SIGHUP reloads it");
            auth
        }
        AuthMode::ClusterToken => {
            let path = config.state_dir.join("token");
            let (token, created) =
                crate::secret::read_or_create(&path).context("the cluster token (no --auth-file was given)")?;
            tracing::info!(
                token_file = %path.display(),
                created,
                "every request needs the cluster token: give clients --token-file with a copy of this file"
            );
            Auth::cluster(&token)
        }
        AuthMode::Off { insecure: true } => {
            tracing::warn!(
                listen = %config.listen,
                "--insecure: no token is asked for; anyone who reaches this address can register and \
                 deregister instances, take their traffic and read everything"
            );
            Auth::off()
        }
        AuthMode::Off { insecure: false } => {
            tracing::info!(listen = %config.listen, "no tokens: listening on loopback alone with no --auth-file");
            Auth::off()
        }
    };
    match &config.webhook_secret_file {
        Some(path) => Ok(auth.with_webhook_secret(path).context("--webhook-secret-file")?),
        None => Ok(auth),
    }
}
