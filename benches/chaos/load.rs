//! What the clients see and what HAProxy holds, while a fault plays: a
//! load of keep-alive and new-connection clients that records every
//! failed request by kind and time, and a monitor that reads HAProxy's
//! server weights from its runtime socket every 50 ms and compares each
//! version's share with the weights in git.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::common::try_socket_command;
use crate::env::{version_of, Weights, BACKEND, SERVICE};

/// Clients of each kind, each sending one request after another.
const KEEP_ALIVE_CLIENTS: usize = 3;
const NEW_CONNECTION_CLIENTS: usize = 3;
/// A request with no whole answer in this long has failed (a client's
/// patience; HAProxy's own server timeout is 60 s).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the monitor reads HAProxy's servers.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// A version's share may differ from git's by this much (percentage
/// points): HAProxy's weights are integers.
const TOLERANCE_PP: f64 = 1.0;

#[derive(Debug, Clone)]
pub struct Failure {
    pub sent: Instant,
    pub ended: Instant,
    pub kind: String,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    failures: Mutex<Vec<Failure>>,
}

pub struct Load {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stats: Arc<Stats>,
}

pub struct LoadResult {
    pub requests: u64,
    pub failures: Vec<Failure>,
}

impl LoadResult {
    /// "N (kind × n, ...)".
    pub fn by_kind(&self) -> String {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for f in &self.failures {
            *kinds.entry(&f.kind).or_default() += 1;
        }
        let parts: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} × {n}")).collect();
        if parts.is_empty() {
            "0".into()
        } else {
            format!("{} ({})", self.failures.len(), parts.join(", "))
        }
    }

    pub fn last_failure(&self) -> Option<Instant> {
        self.failures.iter().map(|f| f.ended).max()
    }

    /// From the first failed request's sending to the last one's end.
    pub fn gap(&self) -> Option<Duration> {
        let first = self.failures.iter().map(|f| f.sent).min()?;
        Some(self.last_failure()? - first)
    }

    /// Failed requests sent at or after `t`.
    pub fn sent_after(&self, t: Instant) -> usize {
        self.failures.iter().filter(|f| f.sent >= t).count()
    }
}

impl Load {
    pub fn start(port: u16) -> Load {
        let stop = CancellationToken::new();
        let stats: Arc<Stats> = Default::default();
        let url = format!("http://127.0.0.1:{port}/{SERVICE}/chaos");
        let mut tasks = Vec::new();
        for i in 0..KEEP_ALIVE_CLIENTS + NEW_CONNECTION_CLIENTS {
            let keep_alive = i < KEEP_ALIVE_CLIENTS;
            let mut builder = reqwest::Client::builder().timeout(CLIENT_TIMEOUT);
            if !keep_alive {
                // No idle connection kept: each request opens its own.
                builder = builder.pool_max_idle_per_host(0);
            }
            let client = builder.build().unwrap();
            let (stop, stats, url) = (stop.clone(), stats.clone(), url.clone());
            let mode = if keep_alive { "keep-alive" } else { "new-conn" };
            tasks.push(tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let sent = Instant::now();
                    let outcome = one(&client, &url).await;
                    stats.requests.fetch_add(1, Ordering::Relaxed);
                    if let Err(kind) = outcome {
                        let failure = Failure { sent, ended: Instant::now(), kind: format!("{mode} {kind}") };
                        stats.failures.lock().unwrap().push(failure);
                        // A refused port fails in microseconds: do not spin.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }));
        }
        Load { stop, tasks, stats }
    }

    pub async fn finish(self) -> LoadResult {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let failures = std::mem::take(&mut *self.stats.failures.lock().unwrap());
        LoadResult { requests: self.stats.requests.load(Ordering::Relaxed), failures }
    }
}

/// One request: Ok, or the kind of failure.
async fn one(client: &reqwest::Client, url: &str) -> Result<(), String> {
    let resp = client.get(url).send().await.map_err(|e| kind(&e))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| kind(&e))?;
    if status != 200 {
        return Err(format!("status {}", status.as_u16()));
    }
    // The answer of an instance (`v1-a /chaos`), not of HAProxy.
    if !(body.starts_with("v1-") || body.starts_with("v2-")) {
        return Err("foreign body".into());
    }
    Ok(())
}

fn kind(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timeout".into();
    }
    if e.is_connect() {
        return "connect".into();
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() {
                return "closed".into();
            }
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionReset => "reset".into(),
                std::io::ErrorKind::ConnectionRefused => "connect".into(),
                std::io::ErrorKind::BrokenPipe => "broken pipe".into(),
                other => format!("io {other:?}"),
            };
        }
        source = s.source();
    }
    "other".into()
}

// ---------------------------------------------------------------------------
// The routes in HAProxy

/// One server as `show servers state` has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub weight: u32,
    /// Takes traffic: not stopped (by a check or an observed error), not
    /// in maintenance or drain, weight above 0.
    pub in_rotation: bool,
}

pub type Servers = BTreeMap<String, Server>;

/// `show servers state BACKEND` on HAProxy's admin socket; None when HAProxy
/// does not answer (down, or between processes).
pub fn read_servers(admin_socket: &std::path::Path) -> Option<Servers> {
    let text = try_socket_command(admin_socket, &format!("show servers state {BACKEND}")).ok()?;
    if text.is_empty() {
        return None;
    }
    if text.starts_with("Can't find backend") {
        return Some(Servers::new());
    }
    if !text.starts_with("1\n") {
        return None;
    }
    let mut out = Servers::new();
    for line in text.lines().skip(1).filter(|l| !l.starts_with('#')) {
        // be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight ...
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(op), Ok(admin), Ok(weight)) = (f[5].parse::<u32>(), f[6].parse::<u32>(), f[7].parse::<u32>()) else {
            continue;
        };
        let in_rotation = op != 0 && admin & 0x09 == 0 && weight > 0;
        out.insert(f[3].to_string(), Server { weight, in_rotation });
    }
    Some(out)
}

/// Whether some servers split traffic between versions as `want` says:
/// every version with a server in rotation gets its weight's share of the
/// versions that have one (a version with none gives its share to the
/// others, as the README says). None when they match, else what is wrong.
pub fn mismatch(servers: &Servers, want: &Weights) -> Option<String> {
    let mut by_version: BTreeMap<&str, u64> = BTreeMap::new();
    for (name, s) in servers.iter().filter(|(_, s)| s.in_rotation) {
        *by_version.entry(version_of(name).unwrap_or("?")).or_default() += s.weight as u64;
    }
    let total: u64 = by_version.values().sum();
    if total == 0 {
        let listed = servers.len();
        let zero = servers.values().filter(|s| s.weight == 0).count();
        return Some(format!("no server in rotation ({listed} listed, {zero} of weight 0)"));
    }
    let live_want: u32 = want.iter().filter(|(v, _)| by_version.contains_key(v.as_str())).map(|(_, w)| w).sum();
    let mut wrong = Vec::new();
    for (v, w) in &by_version {
        let share = 100.0 * *w as f64 / total as f64;
        let target = match want.get(*v) {
            Some(t) if live_want > 0 => 100.0 * *t as f64 / live_want as f64,
            _ => 0.0,
        };
        if (share - target).abs() > TOLERANCE_PP {
            wrong.push(format!("{v} {share:.1} % (git: {target:.1} %)"));
        }
    }
    (!wrong.is_empty()).then(|| wrong.join(", "))
}

/// A stretch of time when HAProxy's routes differed from git's.
#[derive(Debug, Clone)]
pub struct Episode {
    pub from: Instant,
    pub to: Instant,
    pub what: String,
}

#[derive(Default)]
struct Watch {
    /// Any of these weights is right (a fault may leave the old or the new).
    want: Vec<Weights>,
    /// False after [`Monitor::expect`] until a sample matches: a change
    /// being applied is not a fault's doing.
    settled: bool,
    open: Option<Episode>,
    episodes: Vec<Episode>,
    /// Stretches when HAProxy's socket did not answer.
    silent_open: Option<Instant>,
    silent: Vec<(Instant, Instant)>,
    /// When each server entered (true) or left (false) rotation.
    moves: Vec<(Instant, String, bool)>,
    last: Option<Servers>,
    /// Samples whose servers (weights, rotation) differed from the previous one.
    changes: usize,
}

pub struct Monitor {
    watch: Arc<Mutex<Watch>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

pub struct MonitorResult {
    pub episodes: Vec<Episode>,
    pub silent: Vec<(Instant, Instant)>,
    pub moves: Vec<(Instant, String, bool)>,
    pub changes: usize,
}

/// A wrong sample that lasts less than this (one or two polls, as between
/// two Runtime API commands of one apply) is not counted against the routes.
pub const EPISODE_MIN: Duration = Duration::from_millis(250);

impl MonitorResult {
    /// The episodes that count: those that lasted at least [`EPISODE_MIN`].
    pub fn lasting(&self) -> Vec<&Episode> {
        self.episodes.iter().filter(|e| e.to - e.from >= EPISODE_MIN).collect()
    }

    pub fn silent_total(&self) -> Duration {
        self.silent.iter().map(|(a, b)| *b - *a).sum()
    }

    /// When `server` first left rotation at or after `t`.
    pub fn left(&self, server: &str, t: Instant) -> Option<Instant> {
        self.moves.iter().find(|(at, s, inside)| *at >= t && s == server && !inside).map(|(at, ..)| *at)
    }
}

impl Monitor {
    pub fn start(run_dir: PathBuf, want: Weights) -> Monitor {
        let watch = Arc::new(Mutex::new(Watch { want: vec![want], settled: true, ..Default::default() }));
        let stop = CancellationToken::new();
        let socket = run_dir.join("admin.sock");
        let task = {
            let (watch, stop) = (watch.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let socket = socket.clone();
                    let sample = tokio::task::spawn_blocking(move || read_servers(&socket)).await.ok().flatten();
                    watch.lock().unwrap().observe(Instant::now(), sample);
                    tokio::time::sleep(SAMPLE_EVERY).await;
                }
            })
        };
        Monitor { watch, stop, task }
    }

    /// From now on, any of `want` is right; until a sample matches one,
    /// samples do not count (the change is on its way).
    pub fn expect(&self, want: Vec<Weights>) {
        let mut w = self.watch.lock().unwrap();
        w.want = want;
        w.settled = false;
        if let Some(mut e) = w.open.take() {
            e.to = Instant::now();
            w.episodes.push(e);
        }
    }

    pub async fn finish(self) -> MonitorResult {
        self.stop.cancel();
        let _ = self.task.await;
        let mut w = self.watch.lock().unwrap();
        let now = Instant::now();
        if let Some(mut e) = w.open.take() {
            e.to = now;
            w.episodes.push(e);
        }
        if let Some(from) = w.silent_open.take() {
            w.silent.push((from, now));
        }
        MonitorResult {
            episodes: std::mem::take(&mut w.episodes),
            silent: std::mem::take(&mut w.silent),
            moves: std::mem::take(&mut w.moves),
            changes: w.changes,
        }
    }
}

impl Watch {
    fn observe(&mut self, now: Instant, sample: Option<Servers>) {
        let Some(servers) = sample else {
            self.silent_open.get_or_insert(now);
            return;
        };
        if let Some(from) = self.silent_open.take() {
            self.silent.push((from, now));
        }
        if let Some(last) = &self.last {
            if *last != servers {
                self.changes += 1;
            }
            for (name, s) in &servers {
                if last.get(name).map(|l| l.in_rotation) != Some(s.in_rotation) {
                    self.moves.push((now, name.clone(), s.in_rotation));
                }
            }
            for (name, l) in last {
                if l.in_rotation && !servers.contains_key(name) {
                    self.moves.push((now, name.clone(), false));
                }
            }
        }
        let wrong = if self.want.iter().any(|w| mismatch(&servers, w).is_none()) {
            None
        } else {
            Some(mismatch(&servers, &self.want[0]).unwrap_or_default())
        };
        self.last = Some(servers);
        match wrong {
            None => {
                self.settled = true;
                if let Some(mut e) = self.open.take() {
                    e.to = now;
                    self.episodes.push(e);
                }
            }
            Some(_) if !self.settled => {}
            Some(what) => match &mut self.open {
                Some(e) => e.to = now,
                None => self.open = Some(Episode { from: now, to: now, what }),
            },
        }
    }
}
