//! Benchmark: issue 5's hitless figures, each run beside the naive method
//! (render `haproxy.cfg` and `haproxy -sf` on every change, as the original
//! dstack did) in the same run, and reported as figures and as a ratio.
//!
//! `cargo bench --bench hitless [-- NAME...]`, NAME among `propagation`,
//! `failures`, `reloads`, `capacity`, `scale` (all when none is given).
//! Everything runs on 127.0.0.1 in a temp dir; every process it starts
//! (directory, sherlock, HAProxy, wrk) is ended before it returns.
//!
//! 1. propagation: a directory change (PUT or DELETE) until HAProxy's
//!    `show servers state` shows it; p50 and p99 over 200 changes.
//! 2. failures: failed requests under load (wrk keep-alive, plus a client
//!    opening a new connection per request) through 100 instance changes
//!    and through 100 forced reloads.
//! 3. reloads: HAProxy reloads caused by 1,000 instance changes.
//! 4. capacity: the directory's CPU and memory with 10,000 instances
//!    heartbeating once a second.
//! 5. scale: sherlock's render + diff with 1,000 services and 10,000
//!    instances, and one weight change applied to a real HAProxy.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dstack::client::DirectoryClient;
use dstack::model::{Backend, Heartbeat, ServiceBackends, Snapshot};
use dstack::sherlock::haproxy::{socket_command, Haproxy, Paths};
use dstack::sherlock::render::{self, Renderer, Site};
use dstack::sherlock::runtime::{self, ADMIN_FORCED_DRAIN, ADMIN_FORCED_MAINT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const BENCHES: [&str; 5] = ["propagation", "failures", "reloads", "capacity", "scale"];
/// The shared directory's TTLs: long enough that a busy machine never
/// expires a live instance, short enough that warming ends soon.
const MAX_TTL: &str = "10s";
const TTL_MS: u64 = 10_000;
/// How often the bench re-heartbeats the instances it keeps alive.
const REFRESH: Duration = Duration::from_secs(2);
/// Real HTTP servers that the registered instances point at.
const POOL: usize = 24;

fn main() {
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` measures.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<&'static str> =
        BENCHES.into_iter().filter(|b| filters.is_empty() || filters.iter().any(|f| b.contains(f.as_str()))).collect();
    if selected.is_empty() {
        eprintln!("hitless: no benchmark matches {filters:?}; choose among {BENCHES:?}");
        std::process::exit(2);
    }
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let report = rt.block_on(run(selected));
    rt.shutdown_timeout(Duration::from_secs(5));
    println!("\n==================== report (markdown) ====================\n");
    println!("{report}");
    println!("whole run: {:.0} s", started.elapsed().as_secs_f64());
}

async fn run(selected: Vec<&'static str>) -> String {
    let mut out = machine();
    println!("{out}");
    let needs_env = selected.iter().any(|b| ["propagation", "failures", "reloads"].contains(b));
    let env = if needs_env { Some(Arc::new(Env::start().await)) } else { None };
    for name in selected {
        let env = env.clone();
        let t0 = Instant::now();
        eprintln!("--- {name} ...");
        // Each in its own task: a panic in one is reported, the others still run.
        let section = tokio::spawn(async move {
            match name {
                "propagation" => propagation(env.unwrap()).await,
                "failures" => failures(env.unwrap()).await,
                "reloads" => reloads(env.unwrap()).await,
                "capacity" => capacity().await,
                "scale" => scale().await,
                _ => unreachable!(),
            }
        })
        .await;
        let text = match section {
            Ok(text) => text,
            Err(e) => format!("\n## {name}\n\n**FAILED**: {e}\n"),
        };
        let text = format!("{text}\n_{name}: {:.0} s of wall time._\n", t0.elapsed().as_secs_f64());
        println!("{text}");
        out.push_str(&text);
    }
    if let Some(env) = env {
        match Arc::try_unwrap(env) {
            Ok(env) => env.stop().await,
            Err(_) => eprintln!("hitless: the shared directory is still in use; it ends with the process"),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Processes, servers, the directory

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `p`th percentile (0..=100) of some durations, nearest rank.
fn pct(values: &[Duration], p: f64) -> Duration {
    let mut v = values.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ratio(naive: f64, ours: f64) -> String {
    if ours == 0.0 && naive == 0.0 {
        "1 (both 0)".into()
    } else if ours == 0.0 {
        format!("∞ ({naive} vs 0)")
    } else {
        format!("{:.1}×", naive / ours)
    }
}

fn machine() -> String {
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

/// A running binary of this crate; SIGTERM, then SIGKILL, when dropped.
struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn start(dir: &Path, name: &'static str, args: &[String]) -> Proc {
        let bin = match name {
            "directory" => env!("CARGO_BIN_EXE_directory"),
            "sherlock" => env!("CARGO_BIN_EXE_sherlock"),
            other => panic!("no binary {other}"),
        };
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let log = dir.join(format!("{name}-{}.log", SEQ.fetch_add(1, Ordering::Relaxed)));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc { name, child: Some(child), log }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("hitless: {} ignored SIGTERM for 10s; killing it", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0) + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// A `VmRSS:`-style line of /proc/<pid>/status, in MiB.
fn status_mib(pid: i32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// A tiny real HTTP server on loopback, served from this process.
struct Server {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start() -> Server {
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

fn heartbeat(service: &str, port: u16, ttl_ms: u64) -> Heartbeat {
    Heartbeat {
        service: service.parse().unwrap(),
        version: "v1".parse().unwrap(),
        url: format!("http://127.0.0.1:{port}").parse().unwrap(),
        ttl_ms,
    }
}

/// A directory process and its HTTP API.
struct DirectoryProc {
    proc: Proc,
    base: String,
    http: reqwest::Client,
}

impl DirectoryProc {
    async fn start(dir: &Path, max_ttl: &str) -> DirectoryProc {
        let port = free_port();
        let state = dir.join(format!("directory-{port}"));
        let args = [
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--max-ttl".into(),
            max_ttl.into(),
            "--state-dir".into(),
            state.to_str().unwrap().into(),
        ];
        let proc = Proc::start(dir, "directory", &args);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        let d = DirectoryProc { proc, base: format!("http://127.0.0.1:{port}"), http };
        let deadline = Instant::now() + Duration::from_secs(15);
        while d.http.get(format!("{}/v1/status", d.base)).send().await.is_err() {
            assert!(Instant::now() < deadline, "the directory did not answer:\n{}", d.proc.tail());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        d
    }

    async fn put(&self, id: &str, hb: &Heartbeat) -> u64 {
        let url = format!("{}/v1/instances/{id}", self.base);
        let v: serde_json::Value =
            self.http.put(url).json(hb).send().await.unwrap().error_for_status().unwrap().json().await.unwrap();
        v["index"].as_u64().unwrap()
    }

    async fn delete(&self, id: &str) -> u64 {
        let url = format!("{}/v1/instances/{id}", self.base);
        let v: serde_json::Value =
            self.http.delete(url).send().await.unwrap().error_for_status().unwrap().json().await.unwrap();
        v["index"].as_u64().unwrap()
    }

    async fn index(&self) -> u64 {
        let v: serde_json::Value =
            self.http.get(format!("{}/v1/snapshot", self.base)).send().await.unwrap().json().await.unwrap();
        v["index"].as_u64().unwrap()
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self.http.get(format!("{}/metrics", self.base)).send().await.unwrap().text().await.unwrap();
        metric_value(&text, name)
    }

    async fn wait_warm(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v: serde_json::Value =
                self.http.get(format!("{}/v1/status", self.base)).send().await.unwrap().json().await.unwrap();
            if v["warming"] == false {
                return;
            }
            assert!(Instant::now() < deadline, "the directory is still warming after 60s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// The instances the bench keeps alive, re-heartbeated every `REFRESH` as
/// watson would. One lock over changes and refreshes, so a refresh never
/// brings back an instance just deleted.
struct Registrar {
    directory: Arc<DirectoryProc>,
    live: Arc<tokio::sync::Mutex<BTreeMap<String, Heartbeat>>>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Registrar {
    fn new(directory: Arc<DirectoryProc>) -> Registrar {
        let live: Arc<tokio::sync::Mutex<BTreeMap<String, Heartbeat>>> = Default::default();
        let refresher = {
            let (directory, live) = (directory.clone(), live.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(REFRESH).await;
                    let live = live.lock().await;
                    for (id, hb) in live.iter() {
                        directory.put(id, hb).await;
                    }
                }
            })
        };
        Registrar { directory, live, refresher }
    }

    /// Registers an instance; the snapshot index after it and when it was sent.
    async fn add(&self, id: &str, hb: Heartbeat) -> (u64, Instant) {
        let mut live = self.live.lock().await;
        let sent = Instant::now();
        let index = self.directory.put(id, &hb).await;
        live.insert(id.to_string(), hb);
        (index, sent)
    }

    async fn remove(&self, id: &str) -> (u64, Instant) {
        let mut live = self.live.lock().await;
        live.remove(id);
        let sent = Instant::now();
        (self.directory.delete(id).await, sent)
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// What benchmarks 1 to 3 share: one directory, past its warming, and a pool
/// of real HTTP servers for instances to point at.
struct Env {
    tmp: tempfile::TempDir,
    directory: Arc<DirectoryProc>,
    registrar: Registrar,
    pool: Vec<Server>,
}

impl Env {
    async fn start() -> Env {
        let tmp = tempfile::Builder::new().prefix("dstack-bench").tempdir().unwrap();
        let directory = Arc::new(DirectoryProc::start(tmp.path(), MAX_TTL).await);
        let mut pool = Vec::new();
        for _ in 0..POOL {
            pool.push(Server::start().await);
        }
        eprintln!("waiting {MAX_TTL} for the shared directory to end warming (removals apply only after it)");
        directory.wait_warm().await;
        let registrar = Registrar::new(directory.clone());
        Env { tmp, directory, registrar, pool }
    }

    fn port(&self, n: usize) -> u16 {
        self.pool[n % self.pool.len()].port
    }

    async fn stop(self) {
        let Env { tmp, directory, registrar, pool } = self;
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

// ---------------------------------------------------------------------------
// What applies the changes: sherlock in one of its modes, or the naive loop

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
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
    fn label(self) -> &'static str {
        match self {
            Method::Runtime => "sherlock, runtime API (`--coalesce 0s`)",
            Method::Runtime50 => "sherlock, runtime API (default `--coalesce 50ms`)",
            Method::Reload => "sherlock `--apply-mode reload` (seamless reload per change)",
            Method::Naive => "naive: render + `haproxy -D -sf` per change",
        }
    }

    fn prefix(self) -> &'static str {
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

/// A proxy on a loopback port that follows the directory.
struct Target {
    port: u16,
    admin_socket: PathBuf,
    http: reqwest::Client,
    /// sherlock and its --admin address.
    sherlock: Option<(Proc, String)>,
    naive: Option<Naive>,
}

impl Target {
    async fn start(method: Method, tmp: &Path, directory: &str) -> Target {
        let port = free_port();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        let Some(mode) = method.sherlock_args() else {
            let run_dir = tmp.join(format!("n{port}"));
            let naive = Naive::start(directory, port, run_dir.clone());
            return Target { port, admin_socket: run_dir.join("admin.sock"), http, sherlock: None, naive: Some(naive) };
        };
        let run_dir = tmp.join(format!("s{port}"));
        let admin = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = [
            "-d",
            directory,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--name",
            &format!("bench-{port}"),
            "--admin",
            &admin,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(mode.iter().map(|s| s.to_string()));
        let proc = Proc::start(tmp, "sherlock", &args);
        let target = Target {
            port,
            admin_socket: run_dir.join("admin.sock"),
            http,
            sherlock: Some((proc, format!("http://{admin}"))),
            naive: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let admin_up = target.http.get(format!("http://{admin}/status")).send().await.is_ok();
            let proxy_up = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok();
            if admin_up && proxy_up {
                break;
            }
            let (proc, _) = target.sherlock.as_ref().unwrap();
            assert!(Instant::now() < deadline, "sherlock did not start:\n{}", proc.tail());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        target
    }

    async fn admin_get(&self, path: &str) -> String {
        let (_, admin) = self.sherlock.as_ref().unwrap();
        self.http.get(format!("{admin}{path}")).send().await.unwrap().text().await.unwrap()
    }

    /// The snapshot index HAProxy runs now.
    async fn applied(&self) -> u64 {
        match &self.naive {
            Some(n) => n.state.applied.load(Ordering::SeqCst),
            None => {
                let v: serde_json::Value = serde_json::from_str(&self.admin_get("/status").await).unwrap();
                v["applied_index"].as_u64().unwrap()
            }
        }
    }

    async fn wait_applied(&self, index: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.applied().await < index {
            if Instant::now() > deadline {
                let why = match (&self.naive, &self.sherlock) {
                    (Some(n), _) => format!("{:?}", n.state.error.lock().unwrap()),
                    (_, Some((p, _))) => p.tail(),
                    _ => String::new(),
                };
                panic!("index {index} not applied within 60s: {why}");
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }

    async fn reloads(&self) -> u64 {
        match &self.naive {
            Some(n) => n.state.reloads.load(Ordering::SeqCst),
            None => metric_value(&self.admin_get("/metrics").await, "dstack_sherlock_reloads_total") as u64,
        }
    }

    /// Polls HAProxy's runtime state until `server` of `backend` is in
    /// service (`present`) or out of it (absent, draining or in
    /// maintenance); how long after `sent` that was.
    async fn until(&self, backend: &str, server: &str, present: bool, sent: Instant) -> Duration {
        let key = (backend.to_string(), server.to_string());
        let command = format!("show servers state {backend}");
        loop {
            // A worker that is stopping may answer with nothing: only a real
            // table (or HAProxy's "no such backend") counts.
            let answer = socket_command(&self.admin_socket, &command).await.ok();
            let answer = answer.filter(|t| t.starts_with("1\n# be_id") || t.contains("Can't find backend"));
            if let Some(text) = answer {
                let state = runtime::parse_servers_state(&text);
                let in_service =
                    state.get(&key).is_some_and(|s| s.admin & (ADMIN_FORCED_MAINT | ADMIN_FORCED_DRAIN) == 0);
                if in_service == present {
                    return sent.elapsed();
                }
            }
            assert!(sent.elapsed() < Duration::from_secs(60), "{backend}/{server} never became present={present}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn stop(mut self) {
        if let Some((mut proc, _)) = self.sherlock.take() {
            tokio::task::block_in_place(|| proc.stop());
        }
        if let Some(naive) = self.naive.take() {
            naive.stop().await;
        }
    }
}

/// The original dstack's way: long-poll the directory, render the config,
/// write it, and start a new daemon that soft-stops the old one
/// (`haproxy -f cfg -p pidfile -D -sf OLD`: no master-worker, no socket
/// passing). The same renderer as sherlock, minus `master-worker`.
struct Naive {
    state: Arc<NaiveState>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    run_dir: PathBuf,
}

#[derive(Default)]
struct NaiveState {
    applied: AtomicU64,
    reloads: AtomicU64,
    /// Every HAProxy pid it started, to end them all at the end.
    pids: Mutex<Vec<i32>>,
    error: Mutex<Option<String>>,
}

impl Naive {
    fn start(directory: &str, port: u16, run_dir: PathBuf) -> Naive {
        std::fs::create_dir_all(&run_dir).unwrap();
        let state = Arc::new(NaiveState::default());
        let stop = CancellationToken::new();
        let site = Site { bind: format!("127.0.0.1:{port}"), admin_socket: run_dir.join("admin.sock") };
        let task = tokio::spawn(naive_loop(directory.to_string(), site, run_dir.clone(), state.clone(), stop.clone()));
        Naive { state, stop, task: Some(task), run_dir }
    }

    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        tokio::task::block_in_place(|| self.kill_all());
    }

    /// Ends every HAProxy it started that still runs (by pid, checked
    /// against the command line so a reused pid is never signalled).
    fn kill_all(&self) {
        let mut pids = self.state.pids.lock().unwrap().clone();
        if let Some(pid) =
            std::fs::read_to_string(self.run_dir.join("haproxy.pid")).ok().and_then(|p| p.trim().parse().ok())
        {
            pids.push(pid);
        }
        let needle = self.run_dir.to_str().unwrap().to_string();
        let alive = |pid: i32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        };
        for sig in [libc::SIGTERM, libc::SIGKILL] {
            for &pid in pids.iter().filter(|p| alive(**p)) {
                // SAFETY: a pid whose command line names our run dir: our HAProxy.
                unsafe { libc::kill(pid, sig) };
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Naive {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.kill_all();
    }
}

async fn naive_loop(directory: String, site: Site, run_dir: PathBuf, state: Arc<NaiveState>, stop: CancellationToken) {
    let client = DirectoryClient::new(directory.parse().unwrap(), Duration::from_secs(5));
    let renderer = Renderer::new(None).unwrap();
    let (cfg, pidfile) = (run_dir.join("haproxy.cfg"), run_dir.join("haproxy.pid"));
    let mut held = dstack::model::SnapshotId::default();
    loop {
        let snapshot = tokio::select! {
            _ = stop.cancelled() => return,
            s = client.snapshot(held, Duration::from_secs(30), None) => s,
        };
        let snapshot = match snapshot {
            Ok(s) if s.id() != held => s,
            Ok(_) => continue,
            Err(e) => {
                *state.error.lock().unwrap() = Some(e.to_string());
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        held = snapshot.id();
        let text = renderer.render(&site, &snapshot).unwrap().replace("    master-worker\n", "");
        std::fs::write(&cfg, text).unwrap();
        let old = std::fs::read_to_string(&pidfile).ok().map(|p| p.trim().to_string()).filter(|p| !p.is_empty());
        let mut cmd = tokio::process::Command::new("haproxy");
        cmd.arg("-f").arg(&cfg).arg("-p").arg(&pidfile).arg("-D");
        if let Some(old) = &old {
            cmd.arg("-sf").arg(old);
        }
        let out = cmd.stdin(Stdio::null()).kill_on_drop(true).output().await.unwrap();
        if !out.status.success() {
            *state.error.lock().unwrap() = Some(String::from_utf8_lossy(&out.stderr).to_string());
            continue;
        }
        if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse().ok()) {
            state.pids.lock().unwrap().push(pid);
        }
        if old.is_some() {
            state.reloads.fetch_add(1, Ordering::SeqCst);
        }
        state.applied.store(held.index, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------
// 1. Propagation

struct PropRun {
    method: Method,
    adds: Vec<Duration>,
    removes: Vec<Duration>,
    reloads: u64,
    wall: Duration,
}

impl PropRun {
    fn all(&self) -> Vec<Duration> {
        self.adds.iter().chain(&self.removes).copied().collect()
    }
}

const PROP_SERVICES: usize = 10;
const PROP_CHANGES: usize = 200;

async fn propagation_run(env: &Env, method: Method) -> PropRun {
    let p = method.prefix();
    let mut base = Vec::new();
    for s in 0..PROP_SERVICES {
        for j in 0..3 {
            let id = format!("{p}-s{s}-b{j}");
            env.registrar.add(&id, heartbeat(&format!("{p}-s{s}"), env.port(s * 3 + j), TTL_MS)).await;
            base.push(id);
        }
    }
    let target = Target::start(method, env.tmp.path(), &env.directory.base).await;
    target.wait_applied(env.directory.index().await).await;
    let reloads = target.reloads().await;
    let (mut adds, mut removes) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for k in 0..PROP_CHANGES / 2 {
        let service = format!("{p}-s{}", k % PROP_SERVICES);
        let backend = format!("svc_{service}");
        let id = format!("{service}-x{k}");
        let (_, sent) = env.registrar.add(&id, heartbeat(&service, env.port(k), TTL_MS)).await;
        adds.push(target.until(&backend, &id, true, sent).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (_, sent) = env.registrar.remove(&id).await;
        removes.push(target.until(&backend, &id, false, sent).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wall = started.elapsed();
    let reloads = target.reloads().await - reloads;
    target.stop().await;
    for id in base {
        env.registrar.remove(&id).await;
    }
    PropRun { method, adds, removes, reloads, wall }
}

async fn propagation(env: Arc<Env>) -> String {
    let mut runs = Vec::new();
    for method in [Method::Runtime, Method::Naive, Method::Runtime50, Method::Reload] {
        eprintln!("propagation: {}", method.label());
        let run = propagation_run(&env, method).await;
        eprintln!(
            "  p50 {:.1} ms  p99 {:.1} ms  reloads {}",
            ms(pct(&run.all(), 50.0)),
            ms(pct(&run.all(), 99.0)),
            run.reloads
        );
        runs.push(run);
    }
    let naive = runs.iter().find(|r| r.method == Method::Naive).unwrap();
    let (n50, n99) = (ms(pct(&naive.all(), 50.0)), ms(pct(&naive.all(), 99.0)));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## 1. Propagation: directory change → HAProxy runtime state\n\n\
         {PROP_CHANGES} changes per method ({} registrations of a new instance + {} deregistrations), \
         one at a time, over {PROP_SERVICES} services of 3 instances; timed from just before the \
         `PUT`/`DELETE /v1/instances/{{id}}` to the first `show servers state` on the admin socket \
         (polled every ~1 ms) that shows the server in service / out of service (gone, draining or in maintenance).\n\n\
         | method | p50 | p99 | max | p50 add / remove | reloads | target p99 < 100 ms | naive ÷ this (p50, p99) |\n\
         |---|---|---|---|---|---|---|---|",
        PROP_CHANGES / 2,
        PROP_CHANGES / 2
    );
    for r in &runs {
        let all = r.all();
        let (p50, p99) = (ms(pct(&all, 50.0)), ms(pct(&all, 99.0)));
        let _ = writeln!(
            out,
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} / {:.1} ms | {} | {} | {} |",
            r.method.label(),
            p50,
            p99,
            ms(pct(&all, 100.0)),
            ms(pct(&r.adds, 50.0)),
            ms(pct(&r.removes, 50.0)),
            r.reloads,
            if p99 < 100.0 { "met" } else { "**missed**" },
            if r.method == Method::Naive {
                "—".to_string()
            } else {
                format!("{}, {}", ratio(n50, p50), ratio(n99, p99))
            }
        );
    }
    let _ = writeln!(out, "\nWall time per method: {}.", walls(runs.iter().map(|r| (r.method, r.wall))));
    out
}

fn walls(it: impl Iterator<Item = (Method, Duration)>) -> String {
    it.map(|(m, d)| format!("{} {:.1} s", m.prefix(), d.as_secs_f64())).collect::<Vec<_>>().join(", ")
}

// ---------------------------------------------------------------------------
// 2. Failed requests under load

#[derive(Debug, Default, Clone)]
struct WrkResult {
    requests: u64,
    connect: u64,
    read: u64,
    write: u64,
    timeout: u64,
    non2xx: u64,
}

impl WrkResult {
    fn failed(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout + self.non2xx
    }
}

fn parse_wrk(text: &str) -> WrkResult {
    let mut r = WrkResult::default();
    let num = |s: &str| s.trim().trim_end_matches(',').parse::<u64>().unwrap_or(0);
    for line in text.lines().map(str::trim) {
        if let Some(n) = line.split_once(" requests in ").map(|(n, _)| n) {
            r.requests = num(n);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            for pair in words.chunks(2) {
                if let [name, n] = pair {
                    let n = num(n);
                    match *name {
                        "connect" => r.connect = n,
                        "read" => r.read = n,
                        "write" => r.write = n,
                        "timeout" => r.timeout = n,
                        _ => {}
                    }
                }
            }
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non2xx = num(n);
        }
    }
    r
}

/// Two wrk runs at once: keep-alive connections, and a new connection per
/// request (`Connection: close`), the case a listener handover can drop.
struct Load {
    keep_alive: tokio::process::Child,
    close: tokio::process::Child,
    started: Instant,
}

struct LoadResult {
    keep_alive: WrkResult,
    close: WrkResult,
    secs: f64,
}

impl LoadResult {
    fn requests(&self) -> u64 {
        self.keep_alive.requests + self.close.requests
    }

    fn failed(&self) -> u64 {
        self.keep_alive.failed() + self.close.failed()
    }

    fn detail(&self) -> String {
        let mut parts = Vec::new();
        for (mode, w) in [("keep-alive", &self.keep_alive), ("close", &self.close)] {
            for (name, n) in [
                ("connect", w.connect),
                ("read", w.read),
                ("write", w.write),
                ("timeout", w.timeout),
                ("non-2xx", w.non2xx),
            ] {
                if n > 0 {
                    parts.push(format!("{mode} {name} {n}"));
                }
            }
        }
        if parts.is_empty() {
            "—".into()
        } else {
            parts.join(", ")
        }
    }
}

fn wrk(url: &str, extra: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new("wrk")
        .args(["-t1", "-c10", "-d600s", "--timeout", "5s"])
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("wrk (Debian package wrk) must be installed")
}

/// Stops a wrk run (it prints its totals on SIGINT) and reads them.
async fn wrk_finish(child: tokio::process::Child) -> WrkResult {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGINT) };
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("wrk did not stop on SIGINT")
        .unwrap();
    let result = parse_wrk(&String::from_utf8_lossy(&out.stdout));
    assert!(result.requests > 0, "wrk made no request: {}", String::from_utf8_lossy(&out.stderr));
    result
}

impl Load {
    fn start(port: u16, path: &str) -> Load {
        let url = format!("http://127.0.0.1:{port}{path}");
        Load { keep_alive: wrk(&url, &[]), close: wrk(&url, &["-H", "Connection: close"]), started: Instant::now() }
    }

    async fn finish(self) -> LoadResult {
        let secs = self.started.elapsed().as_secs_f64();
        LoadResult { keep_alive: wrk_finish(self.keep_alive).await, close: wrk_finish(self.close).await, secs }
    }
}

struct FailRun {
    method: Method,
    /// (phase, load, reloads during it, wall time of the changes)
    phases: Vec<(&'static str, LoadResult, u64, Duration)>,
}

const LOAD_CHANGES: usize = 100;

async fn failures_run(env: &Env, method: Method) -> FailRun {
    let p = method.prefix();
    let service = format!("{p}-load");
    let (mut live, mut idle): (VecDeque<(String, u16)>, VecDeque<u16>) = (VecDeque::new(), VecDeque::new());
    let mut seq = 0;
    for n in 0..12 {
        if n < 4 {
            let id = format!("{service}-{seq}");
            seq += 1;
            env.registrar.add(&id, heartbeat(&service, env.port(n), TTL_MS)).await;
            live.push_back((id, env.port(n)));
        } else {
            idle.push_back(env.port(n));
        }
    }
    let target = Target::start(method, env.tmp.path(), &env.directory.base).await;
    target.wait_applied(env.directory.index().await).await;
    let path = format!("/{service}/");
    let mut phases = Vec::new();

    // Phase A: instances come and go (the deregistered ones keep serving, as
    // an instance does while its watson deregisters it).
    let reloads = target.reloads().await;
    let load = Load::start(target.port, &path);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    for i in 0..LOAD_CHANGES {
        let index = if i % 2 == 0 {
            let port = idle.pop_front().unwrap();
            let id = format!("{service}-{seq}");
            seq += 1;
            let (index, _) = env.registrar.add(&id, heartbeat(&service, port, TTL_MS)).await;
            live.push_back((id, port));
            index
        } else {
            let (id, port) = live.pop_front().unwrap();
            idle.push_back(port);
            env.registrar.remove(&id).await.0
        };
        target.wait_applied(index).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let result = load.finish().await;
    phases.push(("100 instance changes", result, target.reloads().await - reloads, wall));

    // Phase B: a whole service comes and goes: a reload every time.
    let reloads = target.reloads().await;
    let load = Load::start(target.port, &path);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let extra = format!("{p}-extra");
    for i in 0..LOAD_CHANGES {
        let id = format!("{extra}-{}", i / 2);
        let (index, _) = if i % 2 == 0 {
            env.registrar.add(&id, heartbeat(&extra, env.port(POOL - 1), TTL_MS)).await
        } else {
            env.registrar.remove(&id).await
        };
        target.wait_applied(index).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let result = load.finish().await;
    phases.push(("100 forced reloads (a service added / removed)", result, target.reloads().await - reloads, wall));

    target.stop().await;
    for (id, _) in live {
        env.registrar.remove(&id).await;
    }
    FailRun { method, phases }
}

async fn failures(env: Arc<Env>) -> String {
    let mut runs = Vec::new();
    for method in [Method::Runtime50, Method::Naive, Method::Reload] {
        eprintln!("failures: {}", method.label());
        let run = failures_run(&env, method).await;
        for (phase, r, reloads, _) in &run.phases {
            eprintln!("  {phase}: {} failed of {} ({}), reloads {reloads}", r.failed(), r.requests(), r.detail());
        }
        runs.push(run);
    }
    let naive = runs.iter().find(|r| r.method == Method::Naive).unwrap();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## 2. Failed requests under load\n\n\
         Load through the proxy to a service of 4–5 real HTTP servers (in the bench process), two wrk runs \
         at once for the whole phase: `wrk -t1 -c10 --timeout 5s` (keep-alive) and the same with \
         `-H 'Connection: close'` (a new connection per request, the case a listener handover can drop); \
         failed = socket errors (connect, read, write, timeout) + non-2xx responses. Each change waits until \
         the proxy has applied it, then 20 ms. Phase A: {LOAD_CHANGES} changes alternately register a new \
         instance and deregister the oldest (which keeps serving). Phase B: {LOAD_CHANGES} changes alternately \
         add and remove a second service: a reload for every method.\n\n\
         | method | phase | requests (keep-alive + close) | failed | target 0 | naive failed ÷ this | reloads | failures by kind |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for r in &runs {
        for (i, (phase, load, reloads, _)) in r.phases.iter().enumerate() {
            let failed = load.failed();
            let naive_failed = naive.phases[i].1.failed();
            let _ = writeln!(
                out,
                "| {} | {phase} | {} + {} in {:.0} s | {failed} | {} | {} | {reloads} | {} |",
                r.method.label(),
                load.keep_alive.requests,
                load.close.requests,
                load.secs,
                if failed == 0 { "met" } else { "**missed**" },
                if r.method == Method::Naive { "—".into() } else { ratio(naive_failed as f64, failed as f64) },
                load.detail()
            );
        }
    }
    let _ = writeln!(
        out,
        "\nWall time of the changes (A, B): {}.",
        runs.iter()
            .map(|r| format!(
                "{} {:.1} s, {:.1} s",
                r.method.prefix(),
                r.phases[0].3.as_secs_f64(),
                r.phases[1].3.as_secs_f64()
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    out
}

// ---------------------------------------------------------------------------
// 3. Reloads caused by 1,000 instance changes

const RELOAD_CHANGES: usize = 1_000;

async fn reloads_run(env: &Env, method: Method) -> (u64, Duration) {
    let p = method.prefix();
    let mut base = Vec::new();
    for s in 0..PROP_SERVICES {
        for j in 0..2 {
            let id = format!("{p}-r{s}-b{j}");
            env.registrar.add(&id, heartbeat(&format!("{p}-r{s}"), env.port(s * 2 + j), TTL_MS)).await;
            base.push(id);
        }
    }
    let target = Target::start(method, env.tmp.path(), &env.directory.base).await;
    target.wait_applied(env.directory.index().await).await;
    let reloads = target.reloads().await;
    let started = Instant::now();
    for k in 0..RELOAD_CHANGES {
        let service = format!("{p}-r{}", (k / 2) % PROP_SERVICES);
        let id = format!("{service}-x{}", k / 2);
        let (index, _) = if k % 2 == 0 {
            env.registrar.add(&id, heartbeat(&service, env.port(k), TTL_MS)).await
        } else {
            env.registrar.remove(&id).await
        };
        target.wait_applied(index).await;
    }
    let wall = started.elapsed();
    let reloads = target.reloads().await - reloads;
    target.stop().await;
    for id in base {
        env.registrar.remove(&id).await;
    }
    (reloads, wall)
}

async fn reloads(env: Arc<Env>) -> String {
    let mut rows = Vec::new();
    for method in [Method::Runtime, Method::Naive] {
        eprintln!("reloads: {}", method.label());
        let (n, wall) = reloads_run(&env, method).await;
        eprintln!("  {n} reloads in {:.1} s", wall.as_secs_f64());
        rows.push((method, n, wall));
    }
    let naive = rows.iter().find(|r| r.0 == Method::Naive).unwrap().1;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## 3. HAProxy reloads caused by {RELOAD_CHANGES} instance changes\n\n\
         {RELOAD_CHANGES} changes (alternately register a new instance and deregister it, over \
         {PROP_SERVICES} services of 2 instances), each applied before the next is sent. sherlock's \
         count is `dstack_sherlock_reloads_total` from its `/metrics`; the naive loop counts its own `-sf` runs.\n\n\
         | method | reloads | target 0 | naive ÷ this | wall time of the {RELOAD_CHANGES} changes |\n|---|---|---|---|---|"
    );
    for (method, n, wall) in &rows {
        let _ = writeln!(
            out,
            "| {} | {n} | {} | {} | {:.1} s ({:.1} ms per change) |",
            method.label(),
            if *n == 0 { "met" } else { "**missed**" },
            if *method == Method::Naive { "—".into() } else { ratio(naive as f64, *n as f64) },
            wall.as_secs_f64(),
            ms(*wall) / RELOAD_CHANGES as f64
        );
    }
    out
}

// ---------------------------------------------------------------------------
// 4. Directory capacity

const CAP_INSTANCES: usize = 10_000;
const CAP_SERVICES: usize = 1_000;
const CAP_CONNS: usize = 50;
const CAP_TTL_MS: u64 = 3_000;
const CAP_WINDOW: Duration = Duration::from_secs(20);

/// One keep-alive connection heartbeating its share of the instances, each
/// once a second, spread evenly over the second.
#[allow(clippy::too_many_arguments)]
async fn heartbeat_conn(
    addr: SocketAddr,
    requests: Arc<Vec<Vec<u8>>>,
    offset: Duration,
    catch_up: bool,
    stop: CancellationToken,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    let period = Duration::from_secs(1) / requests.len() as u32;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    tick.set_missed_tick_behavior(if catch_up {
        tokio::time::MissedTickBehavior::Burst
    } else {
        tokio::time::MissedTickBehavior::Delay
    });
    let mut stream: Option<tokio::net::TcpStream> = None;
    let mut buf = vec![0u8; 4096];
    let mut i = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if stream.is_none() {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => {
                    s.set_nodelay(true).ok();
                    stream = Some(s);
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        }
        match exchange(stream.as_mut().unwrap(), &requests[i], &mut buf).await {
            Ok(true) => ok.fetch_add(1, Ordering::Relaxed),
            Ok(false) => failed.fetch_add(1, Ordering::Relaxed),
            Err(_) => {
                stream = None;
                failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        i = (i + 1) % requests.len();
    }
}

/// One request and its whole answer on a keep-alive connection; true on 200.
async fn exchange(stream: &mut tokio::net::TcpStream, request: &[u8], buf: &mut Vec<u8>) -> std::io::Result<bool> {
    stream.write_all(request).await?;
    let mut have = 0;
    loop {
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[have..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
        let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if have >= end + 4 + length {
            return Ok(head.starts_with("http/1.1 200"));
        }
    }
}

struct HeartbeatLoad {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl HeartbeatLoad {
    fn start(
        addr: SocketAddr,
        shares: &[Arc<Vec<Vec<u8>>>],
        catch_up: bool,
        ok: &Arc<AtomicU64>,
        failed: &Arc<AtomicU64>,
    ) -> HeartbeatLoad {
        let stop = CancellationToken::new();
        let tasks = shares
            .iter()
            .enumerate()
            .map(|(c, share)| {
                let offset = Duration::from_secs(1) / share.len() as u32 * c as u32 / CAP_CONNS as u32;
                tokio::spawn(heartbeat_conn(
                    addr,
                    share.clone(),
                    offset,
                    catch_up,
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                ))
            })
            .collect();
        HeartbeatLoad { stop, tasks }
    }

    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// Every instance's `PUT`, split over the connections.
fn heartbeat_requests(addr: SocketAddr, ttl_ms: u64) -> Vec<Arc<Vec<Vec<u8>>>> {
    (0..CAP_CONNS)
        .map(|c| {
            Arc::new(
                (c..CAP_INSTANCES)
                    .step_by(CAP_CONNS)
                    .map(|i| {
                        let s = i % CAP_SERVICES;
                        let hb = Heartbeat {
                            service: format!("cap{s}").parse().unwrap(),
                            version: "v1".parse().unwrap(),
                            url: format!("http://10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256)
                                .parse()
                                .unwrap(),
                            ttl_ms,
                        };
                        let body = serde_json::to_string(&hb).unwrap();
                        format!(
                            "PUT /v1/instances/cap{s}-i{i} HTTP/1.1\r\nHost: {addr}\r\n\
                             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .into_bytes()
                    })
                    .collect(),
            )
        })
        .collect()
}

/// Sends each request of `share` once, back to back, on one connection.
async fn register_all(addr: SocketAddr, share: Arc<Vec<Vec<u8>>>, ok: Arc<AtomicU64>, failed: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 4096];
    let mut stream = None;
    for request in share.iter() {
        if stream.is_none() {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).ok();
            stream = Some(s);
        }
        match exchange(stream.as_mut().unwrap(), request, &mut buf).await {
            Ok(true) => ok.fetch_add(1, Ordering::Relaxed),
            Ok(false) => failed.fetch_add(1, Ordering::Relaxed),
            Err(_) => {
                stream = None;
                failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// What the directory does when 10,000 watsons (1/s, TTL 3 s) find it
/// fresh: (seconds, live instances at the end, heartbeats answered per
/// second, snapshots published, expiries, directory CPU in cores).
async fn cold_with_watson_ttl(tmp: &Path) -> (f64, f64, f64, f64, f64, f64) {
    let directory = DirectoryProc::start(tmp, "10s").await;
    let pid = directory.proc.pid();
    let addr: SocketAddr = directory.base.trim_start_matches("http://").parse().unwrap();
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    let load = HeartbeatLoad::start(addr, &heartbeat_requests(addr, CAP_TTL_MS), false, &ok, &failed);
    tokio::time::sleep(COLD_WINDOW).await;
    let (cpu1, secs) = (cpu_seconds(pid), t0.elapsed().as_secs_f64());
    let answered = ok.load(Ordering::SeqCst) as f64 / secs;
    let m = |name: &'static str| directory.metric(name);
    let (live, published, expired) = (
        m("dstack_directory_instances").await,
        m("dstack_directory_snapshots_published_total").await,
        m("dstack_directory_expiries_total").await,
    );
    load.stop().await;
    (secs, live, answered, published, expired, (cpu1 - cpu0) / secs)
}

/// Registrations propagated to a proxy that follows the 10,000-instance
/// directory: (latencies, reloads, sherlock's mean apply time in ms).
async fn propagation_at_scale(tmp: &Path, directory: &DirectoryProc, method: Method) -> (Vec<Duration>, u64, f64) {
    let target = Target::start(method, tmp, &directory.base).await;
    target.wait_applied(directory.index().await).await;
    let reloads = target.reloads().await;
    let apply_metrics = async || match &target.sherlock {
        Some(_) => {
            let text = target.admin_get("/metrics").await;
            (
                metric_value(&text, "dstack_sherlock_apply_seconds_sum"),
                metric_value(&text, "dstack_sherlock_apply_seconds_count"),
            )
        }
        None => (0.0, 0.0),
    };
    let (sum0, count0) = apply_metrics().await;
    let (mut latencies, mut ids) = (Vec::new(), Vec::new());
    for k in 0..SCALE_CHANGES {
        let service = format!("cap{}", (k * 37) % CAP_SERVICES);
        let id = format!("{service}-{}-n{k}", method.prefix());
        let hb = Heartbeat {
            service: service.parse().unwrap(),
            version: "v1".parse().unwrap(),
            url: format!("http://10.200.0.{}:8080", k + 1).parse().unwrap(),
            ttl_ms: 600_000,
        };
        let sent = Instant::now();
        directory.put(&id, &hb).await;
        latencies.push(target.until(&format!("svc_{service}"), &id, true, sent).await);
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reloads = target.reloads().await - reloads;
    let (sum1, count1) = apply_metrics().await;
    target.stop().await;
    for id in ids {
        directory.delete(&id).await;
    }
    let apply_ms = if count1 > count0 { (sum1 - sum0) * 1000.0 / (count1 - count0) } else { 0.0 };
    (latencies, reloads, apply_ms)
}

const COLD_WINDOW: Duration = Duration::from_secs(15);
const SCALE_CHANGES: usize = 20;

async fn capacity() -> String {
    let tmp = tempfile::Builder::new().prefix("dstack-bench").tempdir().unwrap();
    eprintln!("capacity: {CAP_INSTANCES} watsons (1/s, ttl 3 s) on a fresh directory for {COLD_WINDOW:?}");
    let cold = cold_with_watson_ttl(tmp.path()).await;

    // A long --max-ttl: registering 10,000 instances from cold takes far
    // longer than watson's 3 s TTL (see above), so the one-off registration
    // asks for a long TTL; the steady load then uses 3 s.
    let directory = DirectoryProc::start(tmp.path(), "600s").await;
    let pid = directory.proc.pid();
    let addr: SocketAddr = directory.base.trim_start_matches("http://").parse().unwrap();
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    // Every instance's first heartbeat is a membership change that rebuilds
    // the snapshot; sent once each, 50 at a time.
    eprintln!("capacity: registering {CAP_INSTANCES} instances once each (ttl 600 s)");
    let cpu0 = cpu_seconds(pid);
    let started = Instant::now();
    let tasks: Vec<_> = heartbeat_requests(addr, 600_000)
        .into_iter()
        .map(|share| tokio::spawn(register_all(addr, share, ok.clone(), failed.clone())))
        .collect();
    let mut progress = Vec::new();
    let mut next_sample = Duration::from_secs(10);
    while !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() >= next_sample {
            progress.push((next_sample.as_secs(), ok.load(Ordering::SeqCst)));
            next_sample += Duration::from_secs(10);
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let registered = (started.elapsed(), cpu_seconds(pid) - cpu0, status_mib(pid, "VmHWM:"));
    let registration_failed = failed.load(Ordering::SeqCst);
    eprintln!("capacity: registered in {:.1} s", registered.0.as_secs_f64());

    // Steady state: refreshes only; clients catch up if they fall behind.
    let load = HeartbeatLoad::start(addr, &heartbeat_requests(addr, CAP_TTL_MS), true, &ok, &failed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = |name: &'static str| directory.metric(name);
    let (hb0, pub0, exp0) = (
        m("dstack_directory_heartbeats_total").await,
        m("dstack_directory_snapshots_published_total").await,
        m("dstack_directory_expiries_total").await,
    );
    let (ok0, failed0) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    let (cpu0, self0, t0) = (cpu_seconds(pid), cpu_seconds(std::process::id() as i32), Instant::now());
    tokio::time::sleep(CAP_WINDOW).await;
    let (cpu1, self1, secs) = (cpu_seconds(pid), cpu_seconds(std::process::id() as i32), t0.elapsed().as_secs_f64());
    let (ok1, failed1) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    let (rss, hwm) = (status_mib(pid, "VmRSS:"), status_mib(pid, "VmHWM:"));
    let (hb1, pub1, exp1) = (
        m("dstack_directory_heartbeats_total").await,
        m("dstack_directory_snapshots_published_total").await,
        m("dstack_directory_expiries_total").await,
    );
    let instances = m("dstack_directory_instances").await;
    // With the heartbeat load still running: propagation at full scale.
    let mut at_scale = Vec::new();
    for method in [Method::Runtime, Method::Naive] {
        eprintln!("capacity: propagation at full scale, {}", method.label());
        at_scale.push((method, propagation_at_scale(tmp.path(), &directory, method).await));
    }
    load.stop().await;
    drop(directory);
    drop(tmp);

    let core = (cpu1 - cpu0) / secs;
    let rate = (ok1 - ok0) as f64 / secs;
    let server_rate = (hb1 - hb0) / secs;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## 4. Directory capacity: {CAP_INSTANCES} instances heartbeating once a second\n\n\
         {CAP_INSTANCES} instances over {CAP_SERVICES} services, `ttl_ms` {CAP_TTL_MS}, heartbeated by a \
         tokio client in the bench process over {CAP_CONNS} keep-alive connections (raw HTTP/1.1 `PUT`s, \
         each connection spreading its {} instances evenly over the second). Measured over a {:.0} s \
         window after registration settled: the directory's utime+stime from `/proc/<pid>/stat`, its \
         VmRSS from `/proc/<pid>/status`.\n\n\
         | figure | value | target | verdict |\n|---|---|---|---|\n\
         | directory CPU | {:.3} of one core ({:.1} %) | < 0.5 core | {} |\n\
         | directory resident memory (VmRSS; peak VmHWM) | {:.1} MiB ({:.1} MiB) | < 200 MiB | {} |\n\
         | heartbeat rate achieved (client 200s; directory's own counter) | {:.0}/s ({:.0}/s) | 10,000/s offered | {} |\n\
         | failed heartbeats in the window | {} | 0 | {} |\n\
         | snapshots published / instances expired in the window | {} / {} | 0 / 0 (refreshes change nothing) | {} |\n\
         | live instances at the end | {} | {CAP_INSTANCES} | |\n\
         | load client's own CPU (bench process) | {:.2} of one core | — | |",
        CAP_INSTANCES / CAP_CONNS,
        secs,
        core,
        core * 100.0,
        if core < 0.5 { "met" } else { "**missed**" },
        rss,
        hwm,
        if rss < 200.0 { "met" } else { "**missed**" },
        rate,
        server_rate,
        if rate >= 0.98 * CAP_INSTANCES as f64 { "rate kept" } else { "**rate not kept**" },
        failed1 - failed0,
        if failed1 == failed0 { "met" } else { "**missed**" },
        pub1 - pub0,
        exp1 - exp0,
        if pub1 == pub0 && exp1 == exp0 { "as expected" } else { "**churn**" },
        instances,
        (self1 - self0) / secs,
    );
    let (took, cpu, peak) = registered;
    let curve: Vec<String> = progress.iter().map(|(t, n)| format!("{n} after {t} s")).collect();
    let (cold_secs, cold_live, cold_rate, cold_published, cold_expired, cold_core) = cold;
    let _ = writeln!(
        out,
        "\nThe window above starts from a registry already full. How the registry fills from empty, as after \
         a directory restart (every first heartbeat is a membership change; the directory coalesces the \
         snapshot rebuilds of a burst):\n\n\
         | cold start | figure |\n|---|---|\n\
         | {CAP_INSTANCES} watsons' heartbeats (1/s, `ttl_ms` {CAP_TTL_MS}) on a fresh directory, after {cold_secs:.0} s | \
         **{cold_live:.0} live instances**; {cold_rate:.0} heartbeats/s answered; {cold_published:.0} snapshots \
         published; {cold_expired:.0} instances expired; directory CPU {cold_core:.2} core |\n\
         | registering the {CAP_INSTANCES} once each, 50 at a time (`ttl_ms` 600000) | **{:.1} s**, {:.1} \
         CPU-seconds: {:.2} ms of CPU per registration on average vs {:.3} ms per refresh; {registration_failed} \
         failed; peak RSS {:.1} MiB; progress {} |\n\n\
         The measured window above registers once with a long TTL, then heartbeats with 3 s, so that it \
         measures refreshes alone.",
        took.as_secs_f64(),
        cpu,
        cpu * 1000.0 / CAP_INSTANCES as f64,
        (cpu1 - cpu0) * 1000.0 / (hb1 - hb0).max(1.0),
        peak,
        if curve.is_empty() { "done within 10 s".to_string() } else { curve.join(", ") },
    );
    let naive = at_scale.iter().find(|r| r.0 == Method::Naive).map(|r| ms(pct(&r.1 .0, 50.0))).unwrap_or(0.0);
    let _ = writeln!(
        out,
        "\nPropagation at full scale: a proxy following this directory ({CAP_INSTANCES} instances, {CAP_SERVICES} \
         services, the heartbeat load still running); {SCALE_CHANGES} registrations of a new instance, one at a \
         time, timed from the `PUT` to `show servers state` showing the server in service. (Registrations only: \
         this directory is in its 600 s warming period, during which sherlock by design removes nothing.)\n\n\
         | method | p50 | max | reloads | sherlock's own apply time (mean, from its histogram) | target p99 < 100 ms | naive ÷ this (p50) |\n\
         |---|---|---|---|---|---|---|"
    );
    for (method, (latencies, reloads, apply_ms)) in &at_scale {
        let p50 = ms(pct(latencies, 50.0));
        let _ = writeln!(
            out,
            "| {} | {:.1} ms | {:.1} ms | {reloads} | {} | {} | {} |",
            method.label(),
            p50,
            ms(pct(latencies, 100.0)),
            if *method == Method::Naive { "—".to_string() } else { format!("{apply_ms:.1} ms") },
            if ms(pct(latencies, 99.0)) < 100.0 { "met" } else { "**missed**" },
            if *method == Method::Naive { "—".to_string() } else { ratio(naive, p50) },
        );
    }
    out
}

// ---------------------------------------------------------------------------
// 5. Sherlock with 1,000 services and 10,000 instances

fn big_snapshot() -> Snapshot {
    let mut snapshot = Snapshot { index: 1, ..Snapshot::default() };
    for s in 0..CAP_SERVICES {
        let backends = (0..CAP_INSTANCES / CAP_SERVICES)
            .map(|j| {
                let i = s * (CAP_INSTANCES / CAP_SERVICES) + j;
                Backend {
                    id: format!("svc{s}-v1-{i:05}").parse().unwrap(),
                    url: format!("http://127.0.{}.{}:{}/svc{s}", i / 256 % 256, i % 256, 20_000 + i % 30_000)
                        .parse()
                        .unwrap(),
                    version: "v1".parse().unwrap(),
                    weight: 10,
                }
            })
            .collect();
        snapshot.services.insert(format!("svc{s}").parse().unwrap(), ServiceBackends { backends });
    }
    snapshot
}

/// The snapshot with one server's weight changed (10 <-> 20), and where.
fn one_weight_changed(snapshot: &Snapshot, r: usize) -> (Snapshot, String, String, u32) {
    let mut next = snapshot.clone();
    next.index += 1;
    let (name, svc) = next.services.iter_mut().nth((r * 7) % CAP_SERVICES).unwrap();
    let name = format!("svc_{name}");
    let n = svc.backends.len();
    let backend = &mut svc.backends[r % n];
    backend.weight = if backend.weight == 10 { 20 } else { 10 };
    let (server, weight) = (backend.id.to_string(), backend.weight);
    (next, name, server, weight)
}

fn stats(v: &[Duration]) -> String {
    format!("median {:.2} ms, max {:.2} ms", ms(pct(v, 50.0)), ms(pct(v, 100.0)))
}

async fn scale() -> String {
    const RUNS: usize = 30;
    const CHANGES: usize = 50;
    const RELOADS: usize = 5;
    let tmp = tempfile::Builder::new().prefix("dstack-bench").tempdir().unwrap();
    let paths = Paths::new(tmp.path());
    let site = Site { bind: format!("127.0.0.1:{}", free_port()), admin_socket: paths.admin_socket.clone() };
    let renderer = Renderer::new(None).unwrap();
    let mut snapshot = big_snapshot();
    let mut running = renderer.render(&site, &snapshot).unwrap();
    // sherlock keeps the running config's shape; only the candidate is read.
    let mut running_shape = runtime::Shape::of(&running);

    // Render + diff (and the runtime plan sherlock makes from the diff).
    let (mut renders, mut diffs, mut plans, mut totals) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..RUNS {
        let (next, ..) = one_weight_changed(&snapshot, r);
        let t0 = Instant::now();
        let candidate = renderer.render(&site, &next).unwrap();
        let t1 = Instant::now();
        let d = render::diff(&running, &candidate);
        let t2 = Instant::now();
        let ops = runtime::plan(&running_shape, &runtime::Shape::of(&candidate), &BTreeMap::new());
        let t3 = Instant::now();
        assert!(d.is_some() && ops.as_ref().is_some_and(|o| o.len() == 1), "one weight change is one runtime op");
        renders.push(t1 - t0);
        diffs.push(t2 - t1);
        plans.push(t3 - t2);
        totals.push(t2 - t0);
    }
    eprintln!("scale: render+diff {}", stats(&totals));

    // A real HAProxy running the 10,000-server config.
    std::fs::write(&paths.config, &running).unwrap();
    let mut haproxy = Haproxy::new("haproxy".into(), paths.clone());
    let t0 = Instant::now();
    haproxy.check(&paths.config).await.unwrap();
    let first_check = t0.elapsed();
    let t0 = Instant::now();
    haproxy.start().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while haproxy.runtime_command("show info").await.is_err() {
        assert!(Instant::now() < deadline, "haproxy's admin socket did not answer");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cold_start = t0.elapsed();

    // One weight change at a time through the Runtime API.
    let (mut applies, mut commands, mut end_to_end) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..CHANGES {
        let (next, backend, server, weight) = one_weight_changed(&snapshot, RUNS + r);
        let t0 = Instant::now();
        let candidate = renderer.render(&site, &next).unwrap();
        render::diff(&running, &candidate).expect("a difference");
        let t1 = Instant::now();
        let shape = runtime::Shape::of(&candidate);
        let ops = runtime::plan(&running_shape, &shape, &BTreeMap::new()).expect("a runtime change");
        let t2 = Instant::now();
        for command in ops.iter().flat_map(runtime::Op::commands) {
            let answer = haproxy.runtime_command(&command).await.unwrap();
            assert!(answer.trim().is_empty(), "haproxy refused {command}: {answer}");
        }
        let t3 = Instant::now();
        applies.push(t3 - t1);
        commands.push(t3 - t2);
        end_to_end.push(t3 - t0);
        let state = haproxy.runtime_command(&format!("show servers state {backend}")).await.unwrap();
        let state = runtime::parse_servers_state(&state);
        assert_eq!(state[&(backend, server)].weight, weight, "the weight is in force");
        running = candidate;
        running_shape = shape;
        snapshot = next;
    }
    eprintln!("scale: weight change applied {}", stats(&applies));

    // The naive figure: the same change as `haproxy -c` and a reload.
    let (mut checks, mut reloads) = (Vec::new(), Vec::new());
    for r in 0..RELOADS {
        let (next, ..) = one_weight_changed(&snapshot, RUNS + CHANGES + r);
        let candidate = renderer.render(&site, &next).unwrap();
        std::fs::write(&paths.candidate, &candidate).unwrap();
        let t0 = Instant::now();
        haproxy.check(&paths.candidate).await.unwrap();
        let t1 = Instant::now();
        std::fs::rename(&paths.candidate, &paths.config).unwrap();
        haproxy.reload().await.unwrap();
        let t2 = Instant::now();
        checks.push(t1 - t0);
        reloads.push(t2 - t0);
        running = candidate;
        snapshot = next;
    }
    haproxy.stop().await;
    drop(running);
    drop(tmp);
    eprintln!("scale: check + reload {}", stats(&reloads));

    let render_diff = ms(pct(&totals, 50.0));
    let apply = ms(pct(&applies, 50.0));
    let reload = ms(pct(&reloads, 50.0));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## 5. sherlock with {CAP_SERVICES} services and {CAP_INSTANCES} instances\n\n\
         In process: `Renderer::render` of a snapshot with one weight changed, `render::diff` against the \
         running config, and `runtime::plan` ({RUNS} runs). Then a real HAProxy started on that \
         config (master-worker, as sherlock runs it) and {CHANGES} single weight changes applied through the \
         Runtime API (`runtime::plan` + `set server … weight` on the admin socket, confirmed by \
         `show servers state`), against the reload the naive method needs for the same change \
         (`haproxy -c` + master `reload`, waiting for the new worker; {RELOADS} runs).\n\n\
         | figure | measured | target | verdict | naive figure | naive ÷ this |\n|---|---|---|---|---|---|\n\
         | render + diff | {} | < 50 ms | {} | — | — |\n\
         | — render alone / diff alone / runtime plan | {:.2} / {:.2} / {:.2} ms (medians) | | | | |\n\
         | single weight change applied (plan + Runtime API) | {} | < 10 ms | {} | check + reload: {} | {} |\n\
         | — the Runtime API command alone | {} | | | `haproxy -c` alone: {} | |\n\
         | — end to end (render + diff + plan + command) | {} | | | | |\n\
         | cold start of HAProxy on the config (`haproxy -c`, then start) | {:.0} ms + {:.0} ms | | | | |",
        stats(&totals),
        if render_diff < 50.0 { "met" } else { "**missed**" },
        ms(pct(&renders, 50.0)),
        ms(pct(&diffs, 50.0)),
        ms(pct(&plans, 50.0)),
        stats(&applies),
        if apply < 10.0 { "met" } else { "**missed**" },
        stats(&reloads),
        ratio(reload, apply),
        stats(&commands),
        stats(&checks),
        stats(&end_to_end),
        ms(first_check),
        ms(cold_start),
    );
    out
}
