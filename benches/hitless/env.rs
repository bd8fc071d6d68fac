//! What the benchmarks share: the directory they follow, the instances kept
//! alive in it, the proxy under test (sherlock in one of its modes, or the
//! naive loop), what is read back from HAProxy itself, and the figures'
//! arithmetic. Processes and ports come from the end-to-end tests' harness.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dstack::sherlock::haproxy::socket_command;
use dstack::sherlock::runtime::{self, ADMIN_FORCED_DRAIN, ADMIN_FORCED_MAINT};
use serde_json::{json, Value};

use crate::common::{free_port, haproxy_pids, metric, parse_show_proc, try_socket_command, Proc, ProcState, Security};
use crate::naive::Naive;

/// The shared directory's TTLs: long enough that a busy machine never
/// expires a live instance, short enough that warming ends soon.
pub const MAX_TTL: &str = "10s";
pub const TTL_MS: u64 = 10_000;
/// How often the bench re-heartbeats the instances it keeps alive.
const REFRESH: Duration = Duration::from_secs(2);
/// Real HTTP servers that the registered instances point at.
pub const POOL: usize = 24;
/// The longest any one change may take to show in HAProxy.
const CHANGE_LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Figures

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `p`th percentile (0..=100) of some durations, nearest rank.
pub fn pct(values: &[Duration], p: f64) -> Duration {
    assert!(!values.is_empty(), "a percentile of no values");
    let mut v = values.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// (min, median, max) of some counts; the median of an even number is the lower middle.
pub fn spread(values: &[u64]) -> (u64, u64, u64) {
    assert!(!values.is_empty(), "the spread of no values");
    let mut v = values.to_vec();
    v.sort();
    (v[0], v[(v.len() - 1) / 2], v[v.len() - 1])
}

pub fn ratio(naive: f64, ours: f64) -> String {
    if ours == 0.0 && naive == 0.0 {
        "1 (both 0)".into()
    } else if ours == 0.0 {
        format!("∞ ({naive} vs 0)")
    } else {
        format!("{:.1}×", naive / ours)
    }
}

pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let first_line = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
                text.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_else(|e| format!("{cmd}: {e}"))
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "# hitless benchmark\n\nMachine: {cores} cores (nproc), {model}, Linux {}; {}; {}.\n",
        kernel.trim(),
        first_line("haproxy", "-v"),
        first_line("wrk", "-v").split(" Copyright").next().unwrap_or("")
    )
}

/// A sample with a fraction (the apply histogram's sum, in seconds), which
/// the tests' `metric` reads only as a whole number; a missing or
/// unreadable sample fails the benchmark.
pub fn metric_f64(text: &str, name: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("/metrics has no sample {name}:\n{text}"));
    let value = line.split_whitespace().nth(1).unwrap_or("");
    value.parse().unwrap_or_else(|_| panic!("/metrics: unreadable value in {line:?}"))
}

/// One figure of a shared section, so that a plain run and a secure run
/// of it can be set side by side (`DSTACK_BENCH_SECURE=both`).
#[derive(Debug, Clone)]
pub struct Figure {
    /// What and for which method, e.g. "propagation p99 · sherlock, runtime API".
    pub name: String,
    pub value: f64,
    /// "ms", "s", or "" for a count.
    pub unit: &'static str,
}

pub fn figure(name: impl Into<String>, value: f64, unit: &'static str) -> Figure {
    Figure { name: name.into(), value, unit }
}

/// What a shared section reports: its markdown, and its figures.
pub struct Section {
    pub text: String,
    pub figures: Vec<Figure>,
}

// ---------------------------------------------------------------------------
// Instances and the directory

/// A tiny real HTTP server on loopback, served from this process. (The
/// tests' `Instance` records every request it answers, which a wrk load of
/// a million requests must not pay for.)
pub struct Server {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start() -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new().fallback(|| async { "ok\n" });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        Server { port, task }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The body of `PUT /v1/instances/{id}`.
pub fn heartbeat(service: &str, url: &str, ttl_ms: u64) -> Value {
    json!({ "service": service, "version": "v1", "url": url, "ttl_ms": ttl_ms })
}

/// What the directory answers a `PUT` or `DELETE`: the (epoch, index) of
/// the first snapshot that contains the write. A directory from before
/// epochs answers no epoch, and the index current when it answered, which
/// the write's snapshot may follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Written {
    pub epoch: Option<u64>,
    pub index: u64,
}

impl Written {
    fn of(answer: &Value) -> Written {
        let index = answer["index"].as_u64().unwrap_or_else(|| panic!("a write's answer has no index: {answer}"));
        let epoch = answer.get("epoch").map(|e| e.as_u64().unwrap_or_else(|| panic!("unreadable epoch: {answer}")));
        Written { epoch, index }
    }
}

/// How many snapshots some writes landed in: distinct answered (epoch,
/// index) pairs, or None when the directory answers no epoch (and so not
/// the write's own snapshot).
pub fn snapshots_carrying(written: &[Written]) -> Option<usize> {
    if written.iter().any(|w| w.epoch.is_none()) {
        return None;
    }
    Some(written.iter().collect::<BTreeSet<_>>().len())
}

/// Whether the shared sections run with tokens and TLS: `DSTACK_BENCH_SECURE`
/// is `1` (secure), `both` (plain, then secure, side by side), else plain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Plain,
    Secure,
}

impl Wire {
    pub fn label(self) -> &'static str {
        match self {
            Wire::Plain => "plain HTTP, no tokens",
            Wire::Secure => "tokens and TLS",
        }
    }
}

/// Tokens and TLS as on a real network: the end-to-end tests' `Security`
/// (a private CA and the directory's certificate, an auth file, a watson
/// token for the bench's heartbeats and an operator token for its reads),
/// and one sherlock token that every proxy of the run subscribes with.
pub struct Secure {
    security: Security,
    sherlock_token: PathBuf,
}

impl Secure {
    pub fn new(dir: &Path) -> Secure {
        let security = Security::new(dir);
        let sherlock_token = dir.join("sherlock.token");
        let secret = format!("bench-sherlock-{}", free_port());
        security.add_token(&sherlock_token, &secret, "name: bench\n    role: sherlock");
        Secure { security, sherlock_token }
    }
}

/// A directory process and its HTTP API.
pub struct DirectoryProc {
    pub proc: Proc,
    pub base: String,
    /// Reads (status, metrics): the operator's token when secure.
    http: reqwest::Client,
    /// Writes (`PUT`, `DELETE`), kept alive as watson's: a watson's token when secure.
    writer: reqwest::Client,
    /// The flags a sherlock following it needs (its token and the CA), none when plain.
    pub sherlock_args: Vec<String>,
    /// The naive loop's client for blocking queries, with the sherlock token when secure.
    pub subscriber: reqwest::Client,
}

impl DirectoryProc {
    /// A plain directory (auth off on loopback, as in the demo).
    pub async fn start(dir: &Path, max_ttl: &str) -> DirectoryProc {
        Self::start_with(dir, max_ttl, None).await
    }

    /// A directory, with TLS and the auth file of `secure` when given.
    pub async fn start_with(dir: &Path, max_ttl: &str, secure: Option<&Secure>) -> DirectoryProc {
        let port = free_port();
        let state = dir.join(format!("directory-{port}"));
        let listen = format!("127.0.0.1:{port}");
        let mut args: Vec<String> = ["--listen", &listen, "--max-ttl", max_ttl, "--state-dir", state.to_str().unwrap()]
            .iter()
            .map(|a| a.to_string())
            .collect();
        let client = |token: Option<&Path>| match (secure, token) {
            (Some(s), Some(token)) => s.security.http(token),
            _ => reqwest::Client::builder(),
        };
        let (scheme, reads, writes, subscribes, sherlock_args) = match secure {
            Some(s) => {
                args.extend(s.security.directory_args());
                let sec = &s.security;
                let (reads, writes) = (Some(sec.operator_token.as_path()), Some(sec.watson_token.as_path()));
                ("https", reads, writes, Some(s.sherlock_token.as_path()), sec.client_args(&s.sherlock_token))
            }
            None => ("http", None, None, None, Vec::new()),
        };
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = Proc::start(dir, "directory", &arg_refs);
        let timeout = Duration::from_secs(10);
        let d = DirectoryProc {
            proc,
            base: format!("{scheme}://{listen}"),
            http: client(reads).timeout(timeout).build().unwrap(),
            writer: client(writes).timeout(timeout).build().unwrap(),
            sherlock_args,
            // Longer than the blocking query's 30 s wait.
            subscriber: client(subscribes).timeout(Duration::from_secs(35)).build().unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !d.http.get(format!("{}/v1/status", d.base)).send().await.is_ok_and(|r| r.status().is_success()) {
            assert!(Instant::now() < deadline, "the directory did not answer:\n{}", tail(&d.proc));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        d
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> Result<Value, String> {
        let resp = request.send().await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("unreadable answer {body:?}: {e}"))
    }

    async fn try_put(&self, id: &str, hb: &Value) -> Result<Written, String> {
        let answer = self.json(self.writer.put(format!("{}/v1/instances/{id}", self.base)).json(hb)).await?;
        Ok(Written::of(&answer))
    }

    pub async fn put(&self, id: &str, hb: &Value) -> Written {
        self.try_put(id, hb).await.unwrap_or_else(|e| panic!("PUT /v1/instances/{id}: {e}"))
    }

    pub async fn delete(&self, id: &str) -> Written {
        let answer = self.json(self.writer.delete(format!("{}/v1/instances/{id}", self.base))).await;
        Written::of(&answer.unwrap_or_else(|e| panic!("DELETE /v1/instances/{id}: {e}")))
    }

    pub async fn metrics(&self) -> String {
        let resp = self.http.get(format!("{}/metrics", self.base)).send().await.expect("the directory's /metrics");
        assert!(resp.status().is_success(), "the directory's /metrics: {}", resp.status());
        resp.text().await.unwrap()
    }

    pub async fn metric(&self, name: &str) -> u64 {
        metric(&self.metrics().await, name)
    }

    pub async fn wait_warm(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.json(self.http.get(format!("{}/v1/status", self.base))).await;
            let status = status.unwrap_or_else(|e| panic!("GET /v1/status: {e}"));
            if status["warming"] == false {
                return;
            }
            assert!(Instant::now() < deadline, "the directory is still warming after 60s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The last lines of a process's log.
pub fn tail(proc: &Proc) -> String {
    let text = proc.log_text();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

type Heartbeats = BTreeMap<String, Value>;

/// The instances the bench keeps alive, re-heartbeated every `REFRESH` as
/// watson would. One lock over changes and refreshes, so a refresh never
/// brings back an instance just deleted.
pub struct Registrar {
    directory: Arc<DirectoryProc>,
    live: Arc<tokio::sync::Mutex<Heartbeats>>,
    /// A refresh the directory refused: the instances may expire, so every
    /// later change fails the benchmark rather than measure that.
    broken: Arc<Mutex<Option<String>>>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Registrar {
    fn new(directory: Arc<DirectoryProc>) -> Registrar {
        let live: Arc<tokio::sync::Mutex<Heartbeats>> = Default::default();
        let broken: Arc<Mutex<Option<String>>> = Default::default();
        let refresher = {
            let (directory, live, broken) = (directory.clone(), live.clone(), broken.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(REFRESH).await;
                    let live = live.lock().await;
                    for (id, hb) in live.iter() {
                        if let Err(e) = directory.try_put(id, hb).await {
                            *broken.lock().unwrap() = Some(format!("refreshing {id}: {e}"));
                        }
                    }
                }
            })
        };
        Registrar { directory, live, broken, refresher }
    }

    fn check(&self) {
        if let Some(e) = self.broken.lock().unwrap().as_ref() {
            panic!("the directory refused a refresh heartbeat ({e}); live instances may have expired");
        }
    }

    /// Registers an instance; what the directory answered and when it was sent.
    pub async fn add(&self, id: &str, hb: Value) -> (Written, Instant) {
        self.check();
        let mut live = self.live.lock().await;
        let sent = Instant::now();
        let written = self.directory.put(id, &hb).await;
        live.insert(id.to_string(), hb);
        (written, sent)
    }

    pub async fn remove(&self, id: &str) -> (Written, Instant) {
        self.check();
        let mut live = self.live.lock().await;
        live.remove(id);
        let sent = Instant::now();
        (self.directory.delete(id).await, sent)
    }

    /// Stops refreshing some instances without deregistering them (they
    /// expire after their TTL): the cleanup of a section that failed.
    fn forget(&self, ids: &BTreeSet<String>) {
        if let Ok(mut live) = self.live.try_lock() {
            live.retain(|id, _| !ids.contains(id));
        }
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// What benchmarks 1 to 3 share: one directory, past its warming, and a pool
/// of real HTTP servers for instances to point at.
pub struct Env {
    pub wire: Wire,
    pub tmp: tempfile::TempDir,
    /// The certificates and tokens, when secure; kept for the run.
    _secure: Option<Secure>,
    pub directory: Arc<DirectoryProc>,
    registrar: Registrar,
    pool: Vec<Server>,
    /// Numbers the stages, so that each has services of its own.
    stages: AtomicUsize,
}

impl Env {
    pub async fn start(wire: Wire) -> Env {
        let tmp = tempfile::Builder::new().prefix("dstack-bench").tempdir().unwrap();
        let secure = (wire == Wire::Secure).then(|| Secure::new(tmp.path()));
        let directory = Arc::new(DirectoryProc::start_with(tmp.path(), MAX_TTL, secure.as_ref()).await);
        let mut pool = Vec::new();
        for _ in 0..POOL {
            pool.push(Server::start().await);
        }
        eprintln!(
            "waiting {MAX_TTL} for the shared directory ({}) to end warming (removals apply only after it)",
            wire.label()
        );
        directory.wait_warm().await;
        let registrar = Registrar::new(directory.clone());
        Env { wire, tmp, _secure: secure, directory, registrar, pool, stages: AtomicUsize::new(0) }
    }

    pub fn port(&self, n: usize) -> u16 {
        self.pool[n % self.pool.len()].port
    }

    /// Registers `services` services named `<tag>-<name><s>` of `per`
    /// instances each, starts a proxy of `method` following the directory,
    /// and returns once HAProxy serves every one of those instances.
    pub async fn stage(&self, method: Method, name: &str, services: usize, per: usize) -> Stage<'_> {
        let tag = format!("{}{}", method.prefix(), self.stages.fetch_add(1, Ordering::Relaxed));
        let mut stage = Stage { env: self, target: None, tag, base: Vec::new(), live: BTreeSet::new() };
        for s in 0..services {
            let service = stage.service(&format!("{name}{s}"));
            for j in 0..per {
                let id = format!("{service}-b{j}");
                let port = self.port(s * per + j);
                stage.add(&service, &id, port).await;
                stage.base.push((service.clone(), id, port));
            }
        }
        let target = Target::start(method, self.tmp.path(), &self.directory).await;
        let servers: Vec<(String, String)> =
            stage.base.iter().map(|(service, id, _)| (backend(service), id.clone())).collect();
        target.wait_servers(&servers).await;
        stage.target = Some(target);
        stage
    }

    pub async fn stop(self) {
        let Env { tmp, directory, registrar, pool, _secure, .. } = self;
        drop(registrar);
        drop(pool);
        // The aborted refresher lets go of its handle when the runtime drops it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&directory) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Ok(mut directory) = Arc::try_unwrap(directory) {
            tokio::task::block_in_place(|| directory.proc.stop());
        }
        drop(tmp);
    }
}

/// The HAProxy backend of a service, as sherlock's template names it.
pub fn backend(service: &str) -> String {
    format!("svc_{service}")
}

/// One proxy under test and the instances registered for it: what every
/// benchmark run starts with and ends with.
pub struct Stage<'a> {
    env: &'a Env,
    target: Option<Target>,
    /// Prefixes this stage's services: the method and a sequence number.
    pub tag: String,
    /// (service, instance id, port) of the instances registered before the
    /// proxy started.
    pub base: Vec<(String, String, u16)>,
    /// Every instance this stage registered and has not deregistered.
    live: BTreeSet<String>,
}

impl Stage<'_> {
    pub fn target(&self) -> &Target {
        self.target.as_ref().expect("a started stage")
    }

    /// A service name of this stage's own.
    pub fn service(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    /// Registers an instance at a pool server's port.
    pub async fn add(&mut self, service: &str, id: &str, port: u16) -> (Written, Instant) {
        self.live.insert(id.to_string());
        self.env.registrar.add(id, heartbeat(service, &format!("http://127.0.0.1:{port}"), TTL_MS)).await
    }

    pub async fn remove(&mut self, id: &str) -> (Written, Instant) {
        self.live.remove(id);
        self.env.registrar.remove(id).await
    }

    pub async fn counts(&self) -> Counts {
        self.target().counts(&self.env.directory).await
    }

    /// Stops the proxy and deregisters every instance still registered.
    pub async fn finish(mut self) {
        if let Some(target) = self.target.take() {
            target.stop().await;
        }
        for id in std::mem::take(&mut self.live) {
            self.env.registrar.remove(&id).await;
        }
    }
}

impl Drop for Stage<'_> {
    fn drop(&mut self) {
        // Only after a panic: the proxy's processes end as their handles
        // drop, and the instances expire.
        self.env.registrar.forget(&self.live);
    }
}

// ---------------------------------------------------------------------------
// What applies the changes: sherlock in one of its modes, or the naive loop

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// sherlock --apply-mode runtime --coalesce 0s
    Runtime,
    /// sherlock --apply-mode runtime (default --coalesce 50ms)
    Runtime50,
    /// sherlock --apply-mode reload --coalesce 0s: a seamless reload per change
    Reload,
    /// render + `haproxy -f cfg -p pid -D -sf OLD` per change
    Naive,
}

impl Method {
    pub fn label(self) -> &'static str {
        match self {
            Method::Runtime => "sherlock, runtime API (`--coalesce 0s`)",
            Method::Runtime50 => "sherlock, runtime API (default `--coalesce 50ms`)",
            Method::Reload => "sherlock `--apply-mode reload` (seamless reload per change)",
            Method::Naive => "naive: render + `haproxy -D -sf` per change",
        }
    }

    pub fn prefix(self) -> &'static str {
        match self {
            Method::Runtime => "rt",
            Method::Runtime50 => "rc",
            Method::Reload => "rl",
            Method::Naive => "nv",
        }
    }

    fn sherlock_args(self) -> Option<[&'static str; 4]> {
        match self {
            Method::Runtime => Some(["--apply-mode", "runtime", "--coalesce", "0s"]),
            Method::Runtime50 => Some(["--apply-mode", "runtime", "--coalesce", "50ms"]),
            Method::Reload => Some(["--apply-mode", "reload", "--coalesce", "0s"]),
            Method::Naive => None,
        }
    }
}

/// What the proxy and HAProxy have counted so far. Reloads are read from
/// both sides, so "0 reloads" never rests on the proxy's word alone.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    /// Snapshots the directory has published (its `/metrics`).
    pub published: u64,
    /// Snapshots applied: sherlock's apply histogram count (runtime applies,
    /// reloads and unchanged configs), or the naive loop's renders.
    pub applies: u64,
    /// sherlock's applies through the Runtime API (none for the naive loop).
    pub runtime_applies: u64,
    /// sherlock's snapshots that changed nothing in the config.
    pub unchanged: u64,
    /// Reloads as the proxy counts them: `dstack_sherlock_reloads_total`,
    /// or the naive loop's `haproxy -sf` runs.
    pub reloads: u64,
    /// Reloads as HAProxy counts them: the master's reload counter in
    /// `show proc`; for the naive daemons, the new processes that wrote
    /// HAProxy's pid file.
    pub haproxy_reloads: u64,
    /// The serving processes: `show proc`'s current workers, or the naive
    /// daemon's `Pid` from `show info`.
    pub workers: Vec<u32>,
}

impl Counts {
    pub fn since(&self, before: &Counts) -> Delta {
        Delta {
            published: self.published - before.published,
            applies: self.applies - before.applies,
            runtime_applies: self.runtime_applies - before.runtime_applies,
            unchanged: self.unchanged - before.unchanged,
            reloads: self.reloads - before.reloads,
            haproxy_reloads: self.haproxy_reloads - before.haproxy_reloads,
            workers_before: before.workers.clone(),
            workers_after: self.workers.clone(),
        }
    }
}

/// What happened over one run.
#[derive(Debug, Clone)]
pub struct Delta {
    pub published: u64,
    pub applies: u64,
    pub runtime_applies: u64,
    pub unchanged: u64,
    pub reloads: u64,
    pub haproxy_reloads: u64,
    pub workers_before: Vec<u32>,
    pub workers_after: Vec<u32>,
}

impl Delta {
    /// "own / HAProxy", flagged when the two disagree.
    pub fn reloads_cell(&self) -> String {
        if self.reloads == self.haproxy_reloads {
            format!("{} / {}", self.reloads, self.haproxy_reloads)
        } else {
            format!("{} / {} **disagree**", self.reloads, self.haproxy_reloads)
        }
    }

    /// The serving worker pids before → after the run.
    pub fn workers_cell(&self) -> String {
        let pids = |w: &[u32]| w.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
        if self.workers_before == self.workers_after {
            format!("same ({})", pids(&self.workers_after))
        } else {
            format!("{} → {}", pids(&self.workers_before), pids(&self.workers_after))
        }
    }

    /// No reload by either count, and the same worker throughout.
    pub fn reload_free(&self) -> bool {
        self.reloads == 0 && self.haproxy_reloads == 0 && self.workers_before == self.workers_after
    }
}

/// A proxy on a loopback port that follows the directory.
pub struct Target {
    pub port: u16,
    run_dir: PathBuf,
    admin_socket: PathBuf,
    http: reqwest::Client,
    proxy: Proxy,
}

enum Proxy {
    /// sherlock and its `--admin` base URL.
    Sherlock(Proc, String),
    Naive(Naive),
}

/// One answer of `show servers state` on the admin socket.
enum ServersState {
    /// The table (or HAProxy's "no such backend", an empty table).
    Table(BTreeMap<(String, String), runtime::ServerState>),
    /// No complete answer: a worker that is stopping, or the socket being
    /// rebound by a new process.
    Unavailable,
}

impl Target {
    pub async fn start(method: Method, tmp: &Path, directory: &DirectoryProc) -> Target {
        let port = free_port();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        let Some(mode) = method.sherlock_args() else {
            let run_dir = tmp.join(format!("n{port}"));
            let naive = Naive::start(&directory.base, directory.subscriber.clone(), port, run_dir.clone());
            let admin_socket = run_dir.join("admin.sock");
            return Target { port, run_dir, admin_socket, http, proxy: Proxy::Naive(naive) };
        };
        let run_dir = tmp.join(format!("s{port}"));
        let admin = format!("127.0.0.1:{}", free_port());
        let (listen, name) = (format!("127.0.0.1:{port}"), format!("bench-{port}"));
        let mut args =
            vec!["-d", &directory.base, "--listen", &listen, "--run-dir", run_dir.to_str().unwrap(), "--name", &name];
        args.extend(["--admin", &admin]);
        args.extend(mode);
        args.extend(directory.sherlock_args.iter().map(String::as_str));
        let proc = Proc::start(tmp, "sherlock", &args);
        let admin_socket = run_dir.join("admin.sock");
        let target =
            Target { port, run_dir, admin_socket, http, proxy: Proxy::Sherlock(proc, format!("http://{admin}")) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let admin_up = target.http.get(format!("http://{admin}/status")).send().await.is_ok();
            let proxy_up = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok();
            if admin_up && proxy_up {
                break;
            }
            assert!(Instant::now() < deadline, "sherlock did not start:\n{}", target.why());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        target
    }

    /// What the proxy last said went wrong, for a failure message.
    pub fn why(&self) -> String {
        match &self.proxy {
            Proxy::Sherlock(proc, _) => format!("sherlock's log ends:\n{}", tail(proc)),
            Proxy::Naive(naive) => format!("the naive loop's last error: {:?}", naive.error()),
        }
    }

    /// sherlock's `/metrics`; None for the naive loop.
    pub async fn sherlock_metrics(&self) -> Option<String> {
        let Proxy::Sherlock(_, admin) = &self.proxy else { return None };
        let resp = self.http.get(format!("{admin}/metrics")).send().await.expect("sherlock's /metrics");
        assert!(resp.status().is_success(), "sherlock's /metrics: {}", resp.status());
        Some(resp.text().await.unwrap())
    }

    /// The counters of the proxy, HAProxy and `directory`, once the proxy
    /// and HAProxy agree on the reloads so far: a reload that HAProxy has
    /// done and sherlock has not yet confirmed belongs to the run before.
    pub async fn counts(&self, directory: &DirectoryProc) -> Counts {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counts = self.read_counts(directory).await;
            // A lasting disagreement is a finding: the report shows it.
            if counts.reloads == counts.haproxy_reloads || Instant::now() > deadline {
                return counts;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn read_counts(&self, directory: &DirectoryProc) -> Counts {
        let published = metric(&directory.metrics().await, "dstack_directory_snapshots_published_total");
        match &self.proxy {
            Proxy::Sherlock(..) => {
                let text = self.sherlock_metrics().await.unwrap();
                let proc = show_proc(&self.run_dir.join("master.sock")).await;
                Counts {
                    published,
                    applies: metric(&text, "dstack_sherlock_apply_seconds_count"),
                    runtime_applies: metric(&text, "dstack_sherlock_runtime_applies_total"),
                    unchanged: metric(&text, "dstack_sherlock_unchanged_total"),
                    reloads: metric(&text, "dstack_sherlock_reloads_total"),
                    haproxy_reloads: proc.reloads,
                    workers: proc.workers,
                }
            }
            Proxy::Naive(naive) => {
                let (snapshots, reloads, daemons) = naive.counts();
                // Retried while a new daemon takes the socket over.
                let deadline = Instant::now() + Duration::from_secs(5);
                let answer = loop {
                    match try_socket_command(&self.admin_socket, "show info") {
                        Ok(answer) if !answer.is_empty() => break answer,
                        other => assert!(Instant::now() < deadline, "`show info` on the naive daemon: {other:?}"),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                let pid = answer
                    .lines()
                    .find_map(|l| l.strip_prefix("Pid: "))
                    .and_then(|p| p.trim().parse().ok())
                    .unwrap_or_else(|| panic!("`show info` names no Pid: {answer:?}"));
                Counts {
                    published,
                    applies: snapshots,
                    runtime_applies: 0,
                    unchanged: 0,
                    reloads,
                    haproxy_reloads: daemons.saturating_sub(1),
                    workers: vec![pid],
                }
            }
        }
    }

    /// `show servers state [backend]`; a non-empty answer that is neither
    /// a complete table nor "no such backend" fails the benchmark.
    async fn servers_state(&self, backend: Option<&str>) -> ServersState {
        let command = match backend {
            Some(b) => format!("show servers state {b}"),
            None => "show servers state".to_string(),
        };
        let Ok(text) = socket_command(&self.admin_socket, &command).await else { return ServersState::Unavailable };
        if text.is_empty() {
            return ServersState::Unavailable;
        }
        if text.starts_with("Can't find backend") {
            return ServersState::Table(BTreeMap::new());
        }
        // A whole answer ends with an empty line; a cut one could hide a server.
        assert!(
            text.starts_with("1\n# be_id") && text.ends_with("\n\n"),
            "unreadable answer to `{command}`: {:?}",
            text.chars().take(500).collect::<String>()
        );
        ServersState::Table(runtime::parse_servers_state(&text))
    }

    /// Polls HAProxy's runtime state until `server` of `backend` is in
    /// service (`present`) or out of it (absent, draining or in
    /// maintenance); how long after `sent` that was.
    pub async fn until(&self, backend: &str, server: &str, present: bool, sent: Instant) -> Duration {
        let key = (backend.to_string(), server.to_string());
        loop {
            if let ServersState::Table(state) = self.servers_state(Some(backend)).await {
                if state.get(&key).is_some_and(in_service) == present {
                    return sent.elapsed();
                }
            }
            if sent.elapsed() > CHANGE_LIMIT {
                panic!("{backend}/{server} is not present={present} in HAProxy after {CHANGE_LIMIT:?}; {}", self.why());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Waits until HAProxy has every one of `servers` (backend, server) in service.
    pub async fn wait_servers(&self, servers: &[(String, String)]) {
        let started = Instant::now();
        loop {
            if let ServersState::Table(state) = self.servers_state(None).await {
                if servers.iter().all(|key| state.get(key).is_some_and(in_service)) {
                    return;
                }
            }
            if started.elapsed() > CHANGE_LIMIT {
                panic!("HAProxy does not run all {} servers after {CHANGE_LIMIT:?}; {}", servers.len(), self.why());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the proxy and checks that no HAProxy of its run dir is left.
    pub async fn stop(self) {
        let Target { run_dir, proxy, .. } = self;
        match proxy {
            Proxy::Sherlock(mut proc, _) => tokio::task::block_in_place(|| {
                proc.stop();
            }),
            Proxy::Naive(naive) => naive.stop().await,
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !haproxy_pids(&run_dir).is_empty() {
            assert!(Instant::now() < deadline, "HAProxy processes outlived their proxy: {:?}", haproxy_pids(&run_dir));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `show proc` on a master socket, retried while the master re-executes
/// itself for a reload (its socket refuses then). An answer that cannot be
/// read, or none within 10 s, fails the benchmark. (The tests' `show_proc`
/// polls through `eventually`, whose future is not `Send`: a section runs
/// in a task of its own.)
async fn show_proc(socket: &Path) -> ProcState {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match try_socket_command(socket, "show proc") {
            Ok(answer) if !answer.is_empty() => {
                let state = parse_show_proc(&answer).unwrap_or_else(|| panic!("unreadable `show proc`: {answer:?}"));
                assert!(!state.workers.is_empty(), "`show proc` lists no worker: {answer:?}");
                return state;
            }
            other => assert!(Instant::now() < deadline, "`show proc` on {}: {other:?}", socket.display()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn in_service(s: &runtime::ServerState) -> bool {
    s.admin & (ADMIN_FORCED_MAINT | ADMIN_FORCED_DRAIN) == 0
}
