//! Benchmark 2, failed requests under load, through instance changes and through
//! forced reloads; each failed request by kind (socket error) and by status
//! code, and the naive method several times over, for its spread.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::env::{backend, figure, ratio, spread, Delta, Env, Method, Section, POOL};

const CHANGES: usize = 100;
/// The naive method's failures vary a lot from run to run: run it this often.
const NAIVE_RUNS: usize = 3;
/// Counts wrk's responses by status code (wrk itself gives only a total).
const STATUS_SCRIPT: &str = include_str!("statuses.lua");

/// What one wrk run reports.
#[derive(Debug, Default, Clone)]
struct WrkResult {
    requests: u64,
    connect: u64,
    read: u64,
    write: u64,
    timeout: u64,
    /// wrk's "Non-2xx or 3xx responses" (status 400 and above).
    non2xx: u64,
    /// Every response by status code, from the script.
    statuses: BTreeMap<u16, u64>,
}

impl WrkResult {
    fn failed(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout + self.non2xx
    }
}

/// Reads wrk's summary and the script's status counts; anything missing or
/// inconsistent is an error, never a zero.
fn parse_wrk(text: &str) -> Result<WrkResult, String> {
    let num = |s: &str| s.trim().trim_end_matches(',').parse::<u64>().map_err(|_| format!("unreadable number {s:?}"));
    let mut r = WrkResult::default();
    let (mut requests, mut statuses_end) = (None, false);
    for line in text.lines().map(str::trim) {
        if let Some((n, _)) = line.split_once(" requests in ") {
            requests = Some(num(n)?);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if words.len() != 8 {
                return Err(format!("unreadable line {line:?}"));
            }
            for pair in words.chunks(2) {
                let n = num(pair[1])?;
                match pair[0] {
                    "connect" => r.connect = n,
                    "read" => r.read = n,
                    "write" => r.write = n,
                    "timeout" => r.timeout = n,
                    other => return Err(format!("unknown socket error kind {other:?} in {line:?}")),
                }
            }
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non2xx = num(n)?;
        } else if let Some(rest) = line.strip_prefix("dstack-status ") {
            let (code, n) = rest.split_once(' ').ok_or_else(|| format!("unreadable line {line:?}"))?;
            let code = code.parse().map_err(|_| format!("unreadable status in {line:?}"))?;
            r.statuses.insert(code, num(n)?);
        } else if line == "dstack-status-end" {
            statuses_end = true;
        }
    }
    r.requests = requests.ok_or("no `N requests in` line")?;
    if !statuses_end {
        return Err("no status counts from the script".into());
    }
    let counted: u64 = r.statuses.values().sum();
    let failed: u64 = r.statuses.iter().filter(|(code, _)| **code >= 400).map(|(_, n)| n).sum();
    if counted != r.requests || failed != r.non2xx {
        return Err(format!(
            "the script counted {counted} responses, {failed} of them 400 or above; wrk says {} and {}",
            r.requests, r.non2xx
        ));
    }
    Ok(r)
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

    fn modes(&self) -> [(&'static str, &WrkResult); 2] {
        [("keep-alive", &self.keep_alive), ("close", &self.close)]
    }

    /// Socket errors by kind and connection mode.
    fn socket_errors(&self) -> String {
        let mut parts = Vec::new();
        for (mode, w) in self.modes() {
            for (name, n) in [("connect", w.connect), ("read", w.read), ("write", w.write), ("timeout", w.timeout)] {
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

    /// Responses other than 2xx by status code and connection mode.
    fn statuses(&self) -> String {
        let mut parts = Vec::new();
        for (mode, w) in self.modes() {
            for (code, n) in w.statuses.iter().filter(|(code, _)| !(200..300).contains(*code)) {
                parts.push(format!("{mode} {code} × {n}"));
            }
        }
        if parts.is_empty() {
            "—".into()
        } else {
            parts.join(", ")
        }
    }
}

fn wrk(url: &str, script: &Path, extra: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new("wrk")
        .args(["-t1", "-c10", "-d600s", "--timeout", "5s", "-s"])
        .arg(script)
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
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let result = parse_wrk(&stdout).unwrap_or_else(|e| panic!("wrk's output: {e}:\n{stdout}\n{stderr}"));
    assert!(result.requests > 0, "wrk made no request:\n{stdout}\n{stderr}");
    result
}

impl Load {
    fn start(port: u16, path: &str, script: &Path) -> Load {
        let url = format!("http://127.0.0.1:{port}{path}");
        Load {
            keep_alive: wrk(&url, script, &[]),
            close: wrk(&url, script, &["-H", "Connection: close"]),
            started: Instant::now(),
        }
    }

    async fn finish(self) -> LoadResult {
        let secs = self.started.elapsed().as_secs_f64();
        LoadResult { keep_alive: wrk_finish(self.keep_alive).await, close: wrk_finish(self.close).await, secs }
    }
}

struct Phase {
    name: &'static str,
    load: LoadResult,
    delta: Delta,
    /// Wall time of the changes.
    wall: Duration,
}

struct FailRun {
    method: Method,
    /// 1 for a method's first run, and so on.
    run: usize,
    /// Phase A, then phase B.
    phases: [Phase; 2],
}

const PHASE_A: &str = "100 instance changes";
const PHASE_B: &str = "100 forced reloads (a service added / removed)";

async fn one(env: &Env, method: Method, run: usize) -> FailRun {
    let mut stage = env.stage(method, "load", 1, 4).await;
    let service = stage.base[0].0.clone();
    let mut live: VecDeque<(String, u16)> = stage.base.iter().map(|(_, id, port)| (id.clone(), *port)).collect();
    let mut idle: VecDeque<u16> = (stage.base.len()..12).map(|n| env.port(n)).collect();
    let script = env.tmp.path().join("statuses.lua");
    std::fs::write(&script, STATUS_SCRIPT).unwrap();
    let path = format!("/{service}/");

    // Phase A: instances come and go (the deregistered ones keep serving, as
    // an instance does while its watson deregisters it).
    let before = stage.counts().await;
    let load = Load::start(stage.target().port, &path, &script);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    for i in 0..CHANGES {
        if i % 2 == 0 {
            let port = idle.pop_front().unwrap();
            let id = format!("{service}-n{i}");
            let (_, sent) = stage.add(&service, &id, port).await;
            stage.target().until(&backend(&service), &id, true, sent).await;
            live.push_back((id, port));
        } else {
            let (id, port) = live.pop_front().unwrap();
            let (_, sent) = stage.remove(&id).await;
            stage.target().until(&backend(&service), &id, false, sent).await;
            idle.push_back(port);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let load = load.finish().await;
    let a = Phase { name: PHASE_A, load, delta: stage.counts().await.since(&before), wall };

    // Phase B: a whole service comes and goes: a reload every time.
    let before = stage.counts().await;
    let load = Load::start(stage.target().port, &path, &script);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let extra = stage.service("extra");
    for i in 0..CHANGES {
        let id = format!("{extra}-{}", i / 2);
        let added = i % 2 == 0;
        let (_, sent) = if added { stage.add(&extra, &id, env.port(POOL - 1)).await } else { stage.remove(&id).await };
        stage.target().until(&backend(&extra), &id, added, sent).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let load = load.finish().await;
    let b = Phase { name: PHASE_B, load, delta: stage.counts().await.since(&before), wall };

    stage.finish().await;
    FailRun { method, run, phases: [a, b] }
}

pub async fn run(env: Arc<Env>) -> Section {
    let order = [Method::Runtime50, Method::Naive, Method::Reload]
        .into_iter()
        .chain(std::iter::repeat_n(Method::Naive, NAIVE_RUNS - 1));
    let mut runs: Vec<FailRun> = Vec::new();
    for method in order {
        let run = runs.iter().filter(|r| r.method == method).count() + 1;
        eprintln!("failures: {} (run {run})", method.label());
        let r = one(&env, method, run).await;
        for p in &r.phases {
            eprintln!(
                "  {}: {} failed of {} (socket errors: {}; statuses: {}), reloads (own / HAProxy) {}",
                p.name,
                p.load.failed(),
                p.load.requests(),
                p.load.socket_errors(),
                p.load.statuses(),
                p.delta.reloads_cell()
            );
        }
        runs.push(r);
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## 2. Failed requests under load\n\n\
         Load through the proxy to a service of 4–5 real HTTP servers (in the bench process), two wrk runs \
         at once for the whole phase: `wrk -t1 -c10 --timeout 5s` (keep-alive) and the same with \
         `-H 'Connection: close'` (a new connection per request, the case a listener handover can drop), \
         both with a Lua script that counts responses by status code; failed = socket errors (connect, read, \
         write, timeout) + responses of status 400 and above (wrk's \"Non-2xx or 3xx responses\"). Each \
         change is waited for in HAProxy's `show servers state` (the server in service, or out of service \
         or its backend gone), then 20 ms. Phase A: {CHANGES} changes alternately register a new instance \
         and deregister the oldest (which keeps serving). Phase B: {CHANGES} changes alternately add and \
         remove a second service: a reload for every method. The naive method runs {NAIVE_RUNS} times. \
         Reloads are counted by the proxy and by HAProxy (`show proc`'s reload counter; for the naive \
         daemons, the new processes that wrote the pid file).\n\n\
         | method | run | phase | requests (keep-alive + close) | failed | target 0 | reloads (own / HAProxy) | socket errors | responses not 2xx, by status |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    for r in &runs {
        for p in &r.phases {
            let failed = p.load.failed();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} + {} in {:.0} s | {failed} | {} | {} | {} | {} |",
                r.method.label(),
                r.run,
                p.name,
                p.load.keep_alive.requests,
                p.load.close.requests,
                p.load.secs,
                if failed == 0 { "met" } else { "**missed**" },
                p.delta.reloads_cell(),
                p.load.socket_errors(),
                p.load.statuses(),
            );
        }
    }

    // Per method and phase over its runs; ratios of the medians.
    let failed = |method: Method, phase: usize| -> Vec<u64> {
        runs.iter().filter(|r| r.method == method).map(|r| r.phases[phase].load.failed()).collect()
    };
    let _ = writeln!(
        out,
        "\nFailed requests per method and phase over its runs (min / median / max), and the ratio of the \
         medians to the naive method's and to `sherlock --apply-mode reload`'s: in phase B the runtime mode \
         reloads too, with the same master-worker seamless reload, so the reload mode's row is the \
         like-for-like comparison of a seamless reload with the naive `-sf` handover.\n\n\
         | method | phase | runs | failed: min / median / max | naive ÷ this | reload mode ÷ this |\n\
         |---|---|---|---|---|---|"
    );
    for (phase, name) in [PHASE_A, PHASE_B].into_iter().enumerate() {
        let (_, naive, _) = spread(&failed(Method::Naive, phase));
        let (_, reload, _) = spread(&failed(Method::Reload, phase));
        for method in [Method::Runtime50, Method::Reload, Method::Naive] {
            let counts = failed(method, phase);
            let (min, median, max) = spread(&counts);
            let _ = writeln!(
                out,
                "| {} | {name} | {} | {min} / {median} / {max} | {} | {} |",
                method.label(),
                counts.len(),
                if method == Method::Naive { "—".into() } else { ratio(naive as f64, median as f64) },
                // The naive method against reload mode is the reload row's "naive ÷ this".
                if method == Method::Runtime50 { ratio(reload as f64, median as f64) } else { "—".into() },
            );
        }
    }
    let walls: Vec<String> = runs
        .iter()
        .map(|r| {
            let [a, b] = &r.phases;
            format!("{}#{} {:.1} s, {:.1} s", r.method.prefix(), r.run, a.wall.as_secs_f64(), b.wall.as_secs_f64())
        })
        .collect();
    let _ = writeln!(out, "\nWall time of the changes (A, B): {}.", walls.join("; "));
    let mut figures = Vec::new();
    for (phase, name) in [PHASE_A, PHASE_B].into_iter().enumerate() {
        for method in [Method::Runtime50, Method::Reload, Method::Naive] {
            let label = method.label();
            let (_, median, _) = spread(&failed(method, phase));
            figures.push(figure(format!("2 failed requests, {name} (median) · {label}"), median as f64, ""));
            let walls: Vec<f64> =
                runs.iter().filter(|r| r.method == method).map(|r| r.phases[phase].wall.as_secs_f64()).collect();
            let mean = walls.iter().sum::<f64>() / walls.len() as f64;
            figures.push(figure(format!("2 wall time of the {name} (mean) · {label}"), mean, "s"));
        }
    }
    Section { text: out, figures }
}
