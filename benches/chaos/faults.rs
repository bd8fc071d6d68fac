//! The faults, each played the same way: wait until the cluster is whole
//! (every instance in HAProxy with git's weights, sherlock on the
//! directory's current snapshot), start the load and the monitor, inject
//! the fault, repair it (or let the system do so), wait until whole again,
//! and count.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{haproxy_pids, metric, panic_text};
use crate::env::{base_weights, routes_yaml, weights, Cluster, Weights};
use crate::gitserver::Mode;
use crate::load::{mismatch, read_servers, Load, LoadResult, Monitor, MonitorResult, CLIENT_TIMEOUT, EPISODE_MIN};

pub struct Fault {
    /// What the command line selects it by.
    pub number: &'static str,
    /// Its row's label.
    pub id: &'static str,
    pub name: &'static str,
}

const fn fault(number: &'static str, id: &'static str, name: &'static str) -> Fault {
    Fault { number, id, name }
}

pub const FAULTS: [Fault; 16] = [
    fault("1", "1", "directory SIGKILL and restart, remote reachable"),
    fault("2", "2", "directory SIGKILL and restart, remote unreachable (for 10 s after)"),
    fault("3", "3", "directory down for 30 s (SIGTERM, restart)"),
    fault("4", "4", "one of two directories SIGKILLed (restarted after 5 s)"),
    fault("5", "5", "sherlock SIGKILL, restart while the directory is silent (SIGSTOP)"),
    fault("6", "6", "HAProxy worker SIGKILL"),
    fault("7", "7", "HAProxy master SIGKILL"),
    fault("8", "8", "an instance SIGKILLed (v1-a; restarted once out)"),
    fault("9", "9", "an instance SIGSTOPped for 20 s, then SIGCONT (v1-a)"),
    fault("10", "10", "an instance answering 5 s late for 20 s (v1-b)"),
    fault("11", "11", "the git remote hanging for 20 s (accepts, never answers)"),
    fault("12", "12", "a force-push rewind (80/20 back to 90/10)"),
    fault("13", "13", "a commit deleting all routes"),
    fault("14", "14a", "the run dir's disk full during an apply (5 s)"),
    fault("14", "14b", "the run dir read-only during an apply (5 s)"),
    fault("15", "15", "watson SIGKILL, with its instance (the host gone)"),
];

pub struct Row {
    fault: &'static Fault,
    requests: String,
    failed: String,
    routes: String,
    recover: String,
    /// Why the goal is not met; empty when it is.
    unmet: Vec<String>,
    played: bool,
    notes: Vec<String>,
}

impl Row {
    fn not_played(fault: &'static Fault, why: String) -> Row {
        let dash = || "—".to_string();
        let (requests, failed, routes, recover) = (dash(), dash(), dash(), dash());
        Row { fault, requests, failed, routes, recover, unmet: Vec::new(), played: false, notes: vec![why] }
    }

    pub fn met(&self) -> bool {
        self.played && self.unmet.is_empty()
    }

    pub fn id(&self) -> &'static str {
        self.fault.id
    }

    fn goal(&self) -> String {
        match (self.played, self.unmet.is_empty()) {
            (false, _) => "—".into(),
            (true, true) => "met".into(),
            (true, false) => format!("**not met**: {}", self.unmet.join(", ")),
        }
    }
}

/// What the issue allows a fault's clients to see.
enum Judge {
    /// No failed request.
    NoFailure,
    /// HAProxy's master dies: the failures span at most this long.
    Gap(Duration),
    /// A sick instance (its server name, and when it fell sick): only
    /// requests sent before HAProxy took it out may fail.
    SickInstance(String, Instant),
}

pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| # | fault | requests | failed (by kind) | routes intact | time to recover | goal | notes |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let notes = r.notes.join("; ").replace('|', "\\|").replace('\n', " ");
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.fault.id,
            r.fault.name,
            r.requests,
            r.failed,
            r.routes,
            r.recover,
            r.goal(),
            notes
        ));
    }
    out.push_str(&format!(
        "\nClients: 3 keep-alive and 3 new-connection, each one request after another; a request fails on \
         a non-200, an answer not from an instance, a socket error, or no answer in {} s. Routes intact: \
         HAProxy's weights (runtime socket, every 50 ms) give each version with a server in rotation its \
         share of git's weights within 1 point, \
         with no wrong stretch of {} ms or more, and every instance is back at the end. Time to recover: \
         from the fault's end (the restart, SIGCONT or repair; the kill itself where nothing is restarted) \
         until requests succeed, HAProxy has every instance with git's weights, and sherlock has applied \
         the directory's current snapshot. Goal (the issue's): no failed request, except within a \
         bounded gap for 6 and 7 (1 s) and for requests sent to a sick instance before HAProxy took it out \
         (9, 10); routes intact; the cluster whole again within 60 s; and the fault's own promise \
         where it has one (4: no change in HAProxy; 8, 15: the instance leaves HAProxy; 11: the directory fetches \
         again by itself, and SIGTERM stops it during a hung fetch; 12, 13: a rejected commit in /v1/status; 14: the failed write reported, \
         HAProxy as haproxy.cfg says, the file right once repaired).\n",
        CLIENT_TIMEOUT.as_secs(),
        EPISODE_MIN.as_millis()
    ));
    out
}

pub async fn run(selected: Vec<&'static Fault>) -> Vec<Row> {
    let mut cluster: Option<Cluster> = None;
    let mut rows = Vec::new();
    for f in selected {
        let c = match cluster.take() {
            Some(c) => c,
            None => match tokio::spawn(Cluster::start()).await {
                Ok(c) => c,
                Err(e) => {
                    rows.push(Row::not_played(f, format!("the cluster did not start: {}", panic_text(e))));
                    continue;
                }
            },
        };
        eprintln!("--- fault {}: {}", f.id, f.name);
        let t0 = Instant::now();
        // Its own task: a panic ends this fault (and its cluster, every
        // process of it), not the suite; the next fault gets a new cluster.
        let played = tokio::spawn(async move {
            let mut c = c;
            let row = play(&mut c, f).await;
            (c, row)
        })
        .await;
        let row = match played {
            Ok((c, row)) => {
                cluster = Some(c);
                row
            }
            Err(e) => Row::not_played(f, format!("FAILED: {}", panic_text(e))),
        };
        eprintln!(
            "    {} requests, failed {}, routes intact: {}, recovered in {}, goal {}; {} ({:.0} s)",
            row.requests,
            row.failed,
            row.routes,
            row.recover,
            row.goal(),
            row.notes.join("; "),
            t0.elapsed().as_secs_f64()
        );
        rows.push(row);
    }
    if let Some(c) = cluster {
        tokio::task::spawn_blocking(move || drop(c)).await.ok();
    }
    rows
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn short(v: &Value) -> String {
    v.as_str().map(|s| s[..s.len().min(8)].to_string()).unwrap_or_else(|| v.to_string())
}

// ---------------------------------------------------------------------------
// Whole or not

/// Every instance in rotation with one of `want`'s weights, the directory
/// sherlock follows on `commit`, and sherlock on its snapshot (and, if
/// `warm`, that directory past its warming, so removals apply).
async fn check_whole(c: &Cluster, want: &[Weights], commit: git2::Oid, warm: bool) -> Result<(), String> {
    let socket = c.run_dir.join("admin.sock");
    let servers = tokio::task::spawn_blocking(move || read_servers(&socket))
        .await
        .unwrap()
        .ok_or("HAProxy's socket does not answer")?;
    for (id, instance) in c.ids.iter().zip(&c.instances) {
        if !servers.get(id).is_some_and(|s| s.in_rotation) {
            return Err(format!("{} is not in rotation in HAProxy", instance.name));
        }
    }
    if !want.iter().any(|w| mismatch(&servers, w).is_none()) {
        return Err(format!("HAProxy's weights: {}", mismatch(&servers, &want[0]).unwrap_or_default()));
    }
    let s = c.sherlock_status().await.map_err(|e| format!("sherlock's /status: {e}"))?;
    let base = following(c, &s);
    let d = c.status(&base).await.map_err(|e| format!("sherlock's directory {base} does not answer: {e}"))?;
    if d["commit"] != commit.to_string().as_str() {
        return Err(format!("the directory serves commit {}, not {}", short(&d["commit"]), &commit.to_string()[..8]));
    }
    if warm && d["warming"] != false {
        return Err("the directory is warming".into());
    }
    if s["applied_epoch"] != d["epoch"] || s["applied_index"] != d["index"] {
        return Err(format!(
            "sherlock applied {}/{}, the directory serves {}/{}",
            s["applied_epoch"], s["applied_index"], d["epoch"], d["index"]
        ));
    }
    Ok(())
}

/// The directory sherlock says it follows (the first when it says none).
fn following(c: &Cluster, s: &Value) -> String {
    let named = s["directory"].as_str().unwrap_or("");
    if named.contains(&format!(":{}", c.d2.port)) {
        c.d2.url()
    } else {
        c.d1.url()
    }
}

/// When the cluster was whole, and what it was waited on last (if at all).
async fn whole(
    c: &Cluster,
    want: &[Weights],
    commit: git2::Oid,
    warm: bool,
    limit: Duration,
) -> Result<(Instant, Option<String>), String> {
    let t0 = Instant::now();
    let mut waited = None;
    loop {
        let why = match check_whole(c, want, commit, warm).await {
            Ok(()) => return Ok((Instant::now(), waited)),
            Err(why) => why,
        };
        waited = Some(why.clone());
        if t0.elapsed() > limit {
            return Err(why);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The cluster at rest before a fault; repaired once if it is not.
async fn ready(c: &mut Cluster) -> Result<(), String> {
    let good = c.good.clone();
    if whole(c, std::slice::from_ref(&good.1), good.0, true, Duration::from_secs(30)).await.is_ok() {
        return Ok(());
    }
    restore(c).await;
    whole(c, &[good.1], good.0, true, Duration::from_secs(60))
        .await
        .map(|_| ())
        .map_err(|e| format!("not played: the cluster is not whole before it: {e}"))
}

/// Undoes whatever a fault that did not recover left behind.
async fn restore(c: &mut Cluster) {
    eprintln!("    restoring the cluster");
    c.git.set(Mode::Serve);
    c.git.release();
    if let Some(m) = &c.run_mount {
        let _ = m.remount("rw");
    }
    let _ = std::fs::remove_file(c.run_dir.join(FILLER));
    c.d1.signal(libc::SIGCONT);
    for i in 0..c.instances.len() {
        c.instances[i].signal(libc::SIGCONT);
        c.instances[i].signal(libc::SIGUSR2);
        if !c.instances[i].running() {
            c.instances[i].restart().await;
        }
        if c.watsons[i].is_none() {
            c.watsons[i] = Some(c.start_watson(i));
        }
    }
    if c.d2.proc.is_some() {
        let _ = c.d2.sigterm(Duration::from_secs(10));
    }
    let dir = c.dir().to_path_buf();
    if c.wait_directory(&c.d1.url(), Duration::from_secs(3)).await.is_err() {
        c.d1.sigkill();
        c.d1.start(&dir);
        let _ = c.wait_directory(&c.d1.url(), Duration::from_secs(15)).await;
    }
    c.poke();
    if c.sherlock_status().await.is_err() || read_servers(&c.run_dir.join("admin.sock")).is_none() {
        restart_sherlock(c).await.ok();
    }
}

/// SIGKILLs sherlock (and whatever HAProxy it leaves) and starts it again.
async fn restart_sherlock(c: &mut Cluster) -> Result<Duration, String> {
    if let Some(mut p) = c.sherlock.take() {
        p.kill();
    }
    c.kill_haproxies();
    c.start_sherlock();
    wait_sherlock(c, Duration::from_secs(20)).await
}

/// Until sherlock's admin endpoint answers and HAProxy listens.
async fn wait_sherlock(c: &Cluster, limit: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    loop {
        let admin = c.sherlock_status().await.is_ok();
        let proxy = tokio::net::TcpStream::connect(("127.0.0.1", c.sherlock_port)).await.is_ok();
        if admin && proxy {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            return Err(format!("sherlock: admin answers {admin}, HAProxy listens {proxy}, after {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// One fault's play

struct Play {
    load: Load,
    monitor: Monitor,
}

async fn begin(c: &Cluster, want: Weights) -> Play {
    let monitor = Monitor::start(c.run_dir.clone(), want);
    let load = Load::start(c.sherlock_port);
    // A second of load at rest first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Play { load, monitor }
}

/// Waits for the cluster to be whole again, a second more of load, and
/// counts. Restores the cluster when it did not recover.
async fn end(
    c: &mut Cluster,
    f: &'static Fault,
    play: Play,
    fault_end: Instant,
    want: Vec<Weights>,
    mut notes: Vec<String>,
    judge: Judge,
) -> (Row, LoadResult, MonitorResult) {
    let limit = Duration::from_secs(60);
    let whole_at = whole(c, &want, c.good.0, false, limit).await.map(|(t, waited)| {
        if let Some(why) = waited.filter(|_| t.saturating_duration_since(fault_end) > Duration::from_secs(1)) {
            notes.push(format!("whole {} after the fault's end, last waiting on: {why}", secs(t - fault_end)));
        }
        t
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let load = play.load.finish().await;
    let mon = play.monitor.finish().await;
    let lasting = mon.lasting();
    let routes = match (&whole_at, lasting.iter().max_by_key(|e| e.to - e.from)) {
        (Ok(_), None) => "yes".to_string(),
        (Ok(_), Some(e)) => format!("**no**: {} for {}", e.what, secs(e.to - e.from)),
        (Err(why), None) => format!("**no** at the end: {why}"),
        (Err(why), Some(e)) => format!("**no**: {} for {}; at the end: {why}", e.what, secs(e.to - e.from)),
    };
    let recover = match &whole_at {
        Ok(t) => {
            let mut last = *t;
            last = last.max(load.last_failure().unwrap_or(last));
            last = last.max(lasting.iter().map(|e| e.to).max().unwrap_or(last));
            secs(last.saturating_duration_since(fault_end))
        }
        Err(_) => format!("**not within {} s**", limit.as_secs()),
    };
    if mon.silent_total() > Duration::ZERO {
        notes.push(format!("HAProxy's socket silent {} in all", secs(mon.silent_total())));
    }
    let brief: Vec<Duration> = mon.episodes.iter().map(|e| e.to - e.from).filter(|d| *d < EPISODE_MIN).collect();
    if let Some(longest) = brief.iter().max() {
        notes.push(format!(
            "{} shorter wrong stretches, longest {} ms (not counted)",
            brief.len(),
            longest.as_millis()
        ));
    }
    let mut unmet = Vec::new();
    match judge {
        Judge::NoFailure if !load.failures.is_empty() => unmet.push("requests failed".to_string()),
        Judge::NoFailure => {}
        Judge::Gap(bound) => {
            if let Some(gap) = load.gap().filter(|g| *g > bound) {
                unmet.push(format!("a gap of {} (over {})", secs(gap), secs(bound)));
            }
        }
        Judge::SickInstance(server, since) => match mon.left(&server, since) {
            Some(out) => {
                notes.push(format!(
                    "out of rotation {} after it fell sick; failed requests sent after that: {}",
                    secs(out - since),
                    load.sent_after(out)
                ));
                if load.sent_after(out) > 0 {
                    unmet.push("requests sent after it was out failed".into());
                }
            }
            None => {
                notes.push("never out of rotation".into());
                if !load.failures.is_empty() {
                    unmet.push("requests failed and it was never out".into());
                }
            }
        },
    }
    if !lasting.is_empty() || whole_at.is_err() {
        unmet.push("routes not intact".into());
    }
    if whole_at.is_err() {
        unmet.push("not whole again".into());
    }
    let row = Row {
        fault: f,
        requests: load.requests.to_string(),
        failed: load.by_kind(),
        routes,
        recover,
        unmet,
        played: true,
        notes,
    };
    if whole_at.is_err() {
        restore(c).await;
    }
    (row, load, mon)
}

/// Waits until `server` is out of HAProxy's rotation; how long after `t`.
async fn until_out(c: &Cluster, server: &str, t: Instant, limit: Duration) -> Option<Duration> {
    let socket = c.run_dir.join("admin.sock");
    while t.elapsed() < limit {
        let s = socket.clone();
        let servers = tokio::task::spawn_blocking(move || read_servers(&s)).await.unwrap();
        if servers.is_some_and(|s| !s.get(server).is_some_and(|s| s.in_rotation)) {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn directory_said(c: &Cluster, base: &str) -> String {
    match c.status(base).await {
        Ok(s) => format!(
            "commit {}, warming {}, rejected {}, fetch error {}",
            short(&s["commit"]),
            s["warming"],
            short(&s["routes"]["rejected"]["commit"]),
            s["routes"]["error"].as_str().map(|e| format!("{:?}", &e[..e.len().min(80)])).unwrap_or("none".into())
        ),
        Err(e) => format!("no status: {e}"),
    }
}

const FILLER: &str = "chaos-filler";
/// How long the directory may take to fetch again once a hanging remote
/// answers: its own bound on a silent server (30 s, README) and a retry.
const FETCH_RECOVERY: Duration = Duration::from_secs(40);

async fn play(c: &mut Cluster, f: &'static Fault) -> Row {
    if let Err(why) = ready(c).await {
        return Row::not_played(f, why);
    }
    let base = base_weights();
    let dir = c.dir().to_path_buf();
    let d1 = c.d1.url();
    let mut notes = Vec::new();
    match f.id {
        "1" | "2" => {
            let play = begin(c, base.clone()).await;
            if f.id == "2" {
                c.git.set(Mode::Refuse);
            }
            c.d1.sigkill();
            c.d1.start(&dir);
            let t = Instant::now();
            match c.wait_directory(&d1, Duration::from_secs(15)).await {
                Ok(d) => notes.push(format!("answers {} after the restart: {}", secs(d), directory_said(c, &d1).await)),
                Err(e) => notes.push(e),
            }
            if f.id == "2" {
                tokio::time::sleep(Duration::from_secs(10).saturating_sub(t.elapsed())).await;
                notes.push(format!("10 s on, the remote still down: {}", directory_said(c, &d1).await));
                c.git.set(Mode::Serve);
            }
            // The fault ends with the restart (1), or with the remote back (2).
            let t_end = if f.id == "2" { Instant::now() } else { t };
            end(c, f, play, t_end, vec![base], notes, Judge::NoFailure).await.0
        }
        "3" => {
            let play = begin(c, base.clone()).await;
            match c.d1.sigterm(Duration::from_secs(10)) {
                Ok(d) => notes.push(format!("stopped {} after SIGTERM", secs(d))),
                Err(_) => notes.push("ignored SIGTERM for 10 s (SIGKILLed)".into()),
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
            c.d1.start(&dir);
            let t = Instant::now();
            if let Ok(d) = c.wait_directory(&d1, Duration::from_secs(15)).await {
                notes.push(format!("answers {} after the restart: {}", secs(d), directory_said(c, &d1).await));
            }
            end(c, f, play, t, vec![base], notes, Judge::NoFailure).await.0
        }
        "4" => {
            c.d2.start(&dir);
            let d2 = c.d2.url();
            let good = c.good.0.to_string();
            let t0 = Instant::now();
            loop {
                if let Ok(s) = c.status(&d2).await {
                    let n = s["instances"].as_array().map_or(0, Vec::len);
                    if s["commit"] == good.as_str() && n == c.instances.len() && s["warming"] == false {
                        break;
                    }
                }
                if t0.elapsed() > Duration::from_secs(20) {
                    notes.push(format!("the second directory not ready in 20 s: {}", directory_said(c, &d2).await));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let reloads = |m: Result<String, String>| m.ok().map(|m| metric(&m, "dstack_sherlock_reloads_total"));
            let reloads0 = reloads(c.sherlock_metrics().await);
            let play = begin(c, base.clone()).await;
            c.d1.sigkill();
            let t = Instant::now();
            let port = format!(":{}", c.d2.port);
            loop {
                let s = c.sherlock_status().await.unwrap_or_default();
                if s["directory"].as_str().is_some_and(|d| d.contains(&port)) {
                    notes.push(format!("sherlock on the second directory {} after the kill", secs(t.elapsed())));
                    break;
                }
                if t.elapsed() > Duration::from_secs(15) {
                    notes.push(format!("sherlock not on the second directory after 15 s (says {})", s["directory"]));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_secs(5).saturating_sub(t.elapsed())).await;
            c.d1.start(&dir);
            let t_end = Instant::now();
            let (mut row, _, mon) = end(c, f, play, t_end, vec![base], notes, Judge::NoFailure).await;
            let reloaded = match (reloads0, reloads(c.sherlock_metrics().await)) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
            row.notes.push(format!(
                "HAProxy's servers changed {} times, sherlock reloaded {} times during it",
                mon.changes,
                reloaded.map_or("?".into(), |n| n.to_string())
            ));
            if mon.changes > 0 || reloaded != Some(0) {
                row.unmet.push("HAProxy changed in a failover between equal directories".into());
            }
            // Back to one directory, out of the measure.
            let _ = c.d2.sigterm(Duration::from_secs(10));
            row
        }
        "5" => {
            let play = begin(c, base.clone()).await;
            c.d1.signal(libc::SIGSTOP);
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Some(mut p) = c.sherlock.take() {
                p.kill();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            // HAProxy outlives sherlock and serves on.
            let orphans = haproxy_pids(&c.run_dir);
            let listening = tokio::net::TcpStream::connect(("127.0.0.1", c.sherlock_port)).await.is_ok();
            notes.push(format!("1 s after the kill: {} HAProxy processes, port listening {listening}", orphans.len()));
            tokio::time::sleep(Duration::from_secs(1)).await;
            c.start_sherlock();
            let t = Instant::now();
            match wait_sherlock(c, Duration::from_secs(20)).await {
                Ok(d) => {
                    let servers = read_servers(&c.run_dir.join("admin.sock"));
                    let right = servers.as_ref().is_some_and(|s| mismatch(s, &base).is_none());
                    notes.push(format!(
                        "the new sherlock's HAProxy serving {} after the restart, the directory silent; git's weights then: {right}",
                        secs(d)
                    ));
                }
                Err(e) => notes.push(format!("while the directory was silent: {e}")),
            }
            // It took the old HAProxy over: the old one finishes and leaves.
            let gone = loop {
                let now = haproxy_pids(&c.run_dir);
                if !orphans.is_empty() && now.iter().all(|p| !orphans.contains(p)) {
                    break Some(t.elapsed());
                }
                if t.elapsed() > Duration::from_secs(20) {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            match gone {
                Some(d) => notes.push(format!("the killed sherlock's HAProxy left {} after the restart", secs(d))),
                None => notes.push("the killed sherlock's HAProxy did not leave within 20 s".into()),
            }
            tokio::time::sleep(Duration::from_secs(3).saturating_sub(t.elapsed())).await;
            c.d1.signal(libc::SIGCONT);
            let t_end = Instant::now();
            end(c, f, play, t_end, vec![base], notes, Judge::NoFailure).await.0
        }
        "6" | "7" => {
            let play = begin(c, base.clone()).await;
            let before = c.haproxy_procs();
            let target = match (&before, f.id) {
                (Some((_, workers)), "6") => workers.first().map(|w| *w as i32),
                (Some((master, _)), _) => Some(*master),
                _ => None,
            };
            let t = Instant::now();
            match target {
                // SAFETY: HAProxy started by our sherlock, found through its master socket.
                Some(pid) => unsafe {
                    libc::kill(pid, libc::SIGKILL);
                },
                None => notes.push("no HAProxy process found to kill".into()),
            }
            // The process holding the clients' connections dies in both:
            // the requests it was handling are lost (no proxy can answer
            // them), while new connections wait in the queue of the socket
            // sherlock holds. Both are judged by that bounded gap.
            let judge = Judge::Gap(Duration::from_secs(1));
            let (mut row, load, _) = end(c, f, play, t, vec![base], notes, judge).await;
            let procs = |p: &Option<(i32, Vec<u32>)>| match p {
                Some((master, workers)) => format!("master {master} worker {workers:?}"),
                None => "none".into(),
            };
            row.notes.push(format!("HAProxy {} → {}", procs(&before), procs(&c.haproxy_procs())));
            if let Some(gap) = load.gap() {
                row.notes.push(format!("gap: first to last failed request {}", secs(gap)));
            }
            row
        }
        "8" => {
            let play = begin(c, base.clone()).await;
            c.instances[0].kill();
            let t = Instant::now();
            let out = until_out(c, &c.ids[0], t, Duration::from_secs(15)).await;
            match out {
                Some(d) => notes.push(format!("out of HAProxy {} after the kill", secs(d))),
                None => notes.push("still in HAProxy 15 s after the kill".into()),
            }
            c.instances[0].restart().await;
            let t_end = Instant::now();
            let mut row = end(c, f, play, t_end, vec![base], notes, Judge::NoFailure).await.0;
            if out.is_none() {
                row.unmet.push("the dead instance never left HAProxy".into());
            }
            row
        }
        "9" | "10" => {
            let (i, on, off) =
                if f.id == "9" { (0, libc::SIGSTOP, libc::SIGCONT) } else { (1, libc::SIGUSR1, libc::SIGUSR2) };
            let play = begin(c, base.clone()).await;
            c.instances[i].signal(on);
            let t = Instant::now();
            tokio::time::sleep(Duration::from_secs(20)).await;
            c.instances[i].signal(off);
            let t_end = Instant::now();
            let judge = Judge::SickInstance(c.ids[i].clone(), t);
            let (mut row, load, _) = end(c, f, play, t_end, vec![base], notes, judge).await;
            if let Some(gap) = load.gap() {
                row.notes.push(format!("first to last failed request {}", secs(gap)));
            }
            row
        }
        "11" => {
            let play = begin(c, base.clone()).await;
            c.git.set(Mode::Hang);
            let t = Instant::now();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let z =
                c.push(&[("README.md", "pushed while the remote hangs\n")], "chaos: a commit while the remote hangs");
            c.good.0 = z;
            let (took, answer) = c.reconcile(&d1, Duration::from_secs(10)).await;
            notes.push(match answer {
                Ok(a) => format!("POST /v1/reconcile answered in {}: {}", secs(took), reconciled(Ok(a))),
                Err(e) => format!("POST /v1/reconcile: {e}"),
            });
            tokio::time::sleep(Duration::from_secs(20).saturating_sub(t.elapsed())).await;
            notes.push(format!("connections held by the hanging remote: {}", c.git.held()));
            // The held connections stay open: only a timeout of its own frees the directory.
            c.git.set(Mode::Serve);
            let t_end = Instant::now();
            let zs = z.to_string();
            let fetched = loop {
                if c.status(&d1).await.is_ok_and(|s| s["commit"] == zs.as_str()) {
                    break Some(t_end.elapsed());
                }
                if t_end.elapsed() > FETCH_RECOVERY {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let stuck = fetched.is_none();
            match fetched {
                Some(d) => notes.push(format!("fetched the new commit {} after the remote came back", secs(d))),
                None => {
                    let said = directory_said(c, &d1).await;
                    notes.push(format!("still stuck {} after the remote came back: {said}", secs(FETCH_RECOVERY)));
                    match c.d1.sigterm(Duration::from_secs(10)) {
                        Ok(d) => notes.push(format!("SIGTERM stopped it in {}; restarted", secs(d))),
                        Err(_) => notes.push("it ignored SIGTERM for 10 s (SIGKILLed, restarted)".into()),
                    }
                    c.git.release();
                    c.d1.start(&dir);
                }
            }
            let mut row = end(c, f, play, t_end, vec![base], notes, Judge::NoFailure).await.0;
            c.git.release();
            if stuck {
                row.unmet.push("the directory stayed stuck on the hung fetch".into());
            } else {
                // Out of the measure: SIGTERM while a fetch hangs.
                c.git.set(Mode::Hang);
                c.poke();
                tokio::time::sleep(Duration::from_secs(2)).await;
                match c.d1.sigterm(Duration::from_secs(10)) {
                    Ok(d) => row.notes.push(format!("SIGTERM during a hung fetch: stopped in {}", secs(d))),
                    Err(_) => {
                        row.notes.push("SIGTERM during a hung fetch: ignored for 10 s (SIGKILLed)".into());
                        row.unmet.push("SIGTERM ignored during a hung fetch".into());
                    }
                }
                c.git.set(Mode::Serve);
                c.git.release();
                c.d1.start(&dir);
            }
            row
        }
        "12" => {
            let x = c.good.0;
            let w8020 = weights(&[("v1", 80), ("v2", 20)]);
            let y = c.push(&[("routes/barker.yaml", &routes_yaml(&w8020))], "barker: v1 80, v2 20");
            c.good = (y, w8020.clone());
            if let Err(e) = whole(c, std::slice::from_ref(&w8020), y, true, Duration::from_secs(30)).await {
                return Row::not_played(f, format!("80/20 never applied: {e}"));
            }
            let play = begin(c, w8020).await;
            c.force_push(x);
            let t = Instant::now();
            let (took, answer) = c.reconcile(&d1, Duration::from_secs(10)).await;
            notes.push(format!("reconcile answered in {}: {}", secs(took), reconciled(answer)));
            tokio::time::sleep(Duration::from_secs(5).saturating_sub(t.elapsed())).await;
            notes.push(format!("5 s on: {}", directory_said(c, &d1).await));
            let shown = c.status(&d1).await.is_ok_and(|s| !s["routes"]["rejected"].is_null());
            // The repair: forward again, to 90/10 on top of 80/20.
            let z = c.push(&[("routes/barker.yaml", &routes_yaml(&base))], "barker: back to v1 90, v2 10");
            play.monitor.expect(vec![base.clone()]);
            c.good = (z, base.clone());
            let t_end = Instant::now();
            let mut row = end(c, f, play, t_end, vec![base], notes, Judge::NoFailure).await.0;
            if !shown {
                row.unmet.push("no rejected commit in /v1/status".into());
            }
            row
        }
        "13" => {
            let play = begin(c, base.clone()).await;
            let d = c.push_removal("routes/barker.yaml", "remove every route");
            let t = Instant::now();
            let (took, answer) = c.reconcile(&d1, Duration::from_secs(10)).await;
            notes.push(format!("reconcile answered in {}: {}", secs(took), reconciled(answer)));
            tokio::time::sleep(Duration::from_secs(5).saturating_sub(t.elapsed())).await;
            notes.push(format!("5 s on: {}", directory_said(c, &d1).await));
            let shown = c.status(&d1).await.is_ok_and(|s| !s["routes"]["rejected"].is_null());
            let r = c.repo().revert(d);
            c.poke();
            c.good.0 = r;
            let t_end = Instant::now();
            let mut row = end(c, f, play, t_end, vec![base], notes, Judge::NoFailure).await.0;
            if !shown {
                row.unmet.push("no rejected commit in /v1/status".into());
            }
            row
        }
        "14a" | "14b" => {
            let Some(mount) = &c.run_mount else {
                let why = c.mount_error.clone().unwrap_or_default();
                return Row::not_played(f, format!("not played: the run dir is no tmpfs ({why})"));
            };
            let w8020 = weights(&[("v1", 80), ("v2", 20)]);
            let play = begin(c, base.clone()).await;
            let broken = if f.id == "14a" {
                fill(&mount.path.join(FILLER))
            } else {
                mount.remount("ro").map(|_| "mounted read-only".to_string())
            };
            match broken {
                Ok(how) => notes.push(how),
                Err(e) => notes.push(format!("could not break the run dir: {e}")),
            }
            let t = Instant::now();
            let w = c.push(&[("routes/barker.yaml", &routes_yaml(&w8020))], "barker: v1 80, v2 20");
            // The old weights or the new, never a mix of the two.
            play.monitor.expect(vec![base.clone(), w8020.clone()]);
            tokio::time::sleep(Duration::from_secs(5).saturating_sub(t.elapsed())).await;
            let s = c.sherlock_status().await.unwrap_or_default();
            let servers = read_servers(&c.run_dir.join("admin.sock"));
            let state = match servers {
                Some(s) if mismatch(&s, &w8020).is_none() => "the new weights",
                Some(s) if mismatch(&s, &base).is_none() => "the old weights",
                Some(_) => "**a mix**",
                None => "**no answer**",
            };
            let mut promise = Vec::new();
            let on_disk = match cfg_servers(&c.run_dir.join("haproxy.cfg")) {
                Some(s) if mismatch(&s, &w8020).is_none() => "the new weights",
                Some(s) if mismatch(&s, &base).is_none() => "the old weights",
                Some(_) => "**a mix**",
                None => "**unreadable**",
            };
            if state != on_disk {
                promise.push("half-applied: HAProxy and haproxy.cfg disagree".to_string());
            }
            if s["last_error"].is_null() {
                promise.push("the failed write not reported in /status".to_string());
            }
            notes.push(format!(
                "5 s on: HAProxy has {state}, haproxy.cfg {on_disk}; sherlock: haproxy_running {}, last_error {}",
                s["haproxy_running"],
                s["last_error"].as_str().map(|e| format!("{:?}", &e[..e.len().min(100)])).unwrap_or("none".into())
            ));
            let repaired = if f.id == "14a" {
                std::fs::remove_file(mount.path.join(FILLER)).map_err(|e| e.to_string())
            } else {
                mount.remount("rw")
            };
            if let Err(e) = repaired {
                notes.push(format!("repair failed: {e}"));
            }
            let t_end = Instant::now();
            play.monitor.expect(vec![w8020.clone()]);
            c.good = (w, w8020.clone());
            let mut row = end(c, f, play, t_end, vec![w8020.clone()], notes, Judge::NoFailure).await.0;
            let rewritten = cfg_servers(&c.run_dir.join("haproxy.cfg")).is_some_and(|s| mismatch(&s, &w8020).is_none());
            row.notes.push(format!("haproxy.cfg has the new weights once repaired: {rewritten}"));
            if !rewritten {
                promise.push("haproxy.cfg not rewritten after the repair".into());
            }
            row.unmet.extend(promise);
            // Back to 90/10, out of the measure.
            let b = c.push(&[("routes/barker.yaml", &routes_yaml(&base))], "barker: back to v1 90, v2 10");
            c.good = (b, base);
            row
        }
        "15" => {
            let play = begin(c, base.clone()).await;
            if let Some(mut w) = c.watsons[3].take() {
                w.kill();
            }
            c.instances[3].kill();
            let t = Instant::now();
            let out = until_out(c, &c.ids[3], t, Duration::from_secs(20)).await;
            match out {
                Some(d) => notes.push(format!("v2-b out of HAProxy {} after the kill (TTL 3 s)", secs(d))),
                None => notes.push("v2-b still in HAProxy 20 s after the kill".into()),
            }
            c.instances[3].restart().await;
            c.watsons[3] = Some(c.start_watson(3));
            let t_end = Instant::now();
            let mut row = end(c, f, play, t_end, vec![base], notes, Judge::NoFailure).await.0;
            if out.is_none() {
                row.unmet.push("the instance never expired".into());
            }
            row
        }
        other => unreachable!("fault {other}"),
    }
}

/// Fills a file until the disk is full.
fn fill(path: &std::path::Path) -> Result<String, String> {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let chunk = vec![0u8; 64 << 10];
    let mut written = 0usize;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    let _ = file.sync_all();
    Ok(format!("disk full ({} KiB of filler)", written >> 10))
}

/// A reconcile answer in brief: the commit in force, any rejected commit, any error.
fn reconciled(answer: Result<String, String>) -> String {
    let text = match answer {
        Ok(text) => text,
        Err(e) => return e,
    };
    let at = text.find('{').unwrap_or(text.len());
    let (status, body) = (text[..at].trim(), &text[at..]);
    match serde_json::from_str::<Value>(body) {
        Ok(v) => format!(
            "{status}, commit {}, rejected {}, error {}",
            short(&v["commit"]),
            short(&v["rejected"]["commit"]),
            v["error"].as_str().map(|e| format!("{:?}", &e[..e.len().min(80)])).unwrap_or("none".into())
        ),
        Err(_) => text.chars().take(120).collect(),
    }
}

/// The servers of `haproxy.cfg` on disk (`server NAME ADDR weight W` in
/// the service's backend), as the monitor reads them from HAProxy.
fn cfg_servers(path: &std::path::Path) -> Option<crate::load::Servers> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut out = crate::load::Servers::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("backend ") {
            inside = name.trim() == crate::env::BACKEND;
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if inside && f.first() == Some(&"server") {
            let weight = f.iter().position(|w| *w == "weight").and_then(|i| f.get(i + 1)?.parse().ok()).unwrap_or(1);
            out.insert(f[1].to_string(), crate::load::Server { weight, in_rotation: weight > 0 });
        }
    }
    Some(out)
}
