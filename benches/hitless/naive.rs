//! The original dstack's way, the baseline of every benchmark: long-poll
//! the directory, render the config, write it, and start a new daemon that
//! soft-stops the old one (`haproxy -f cfg -p pidfile -D -sf OLD`: no
//! master-worker, no socket passing). The same renderer as sherlock, minus
//! `master-worker`.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dstack::model::Snapshot;
use dstack::sherlock::render::{Renderer, Site};
use tokio_util::sync::CancellationToken;

pub struct Naive {
    state: Arc<NaiveState>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    run_dir: PathBuf,
}

#[derive(Default)]
struct NaiveState {
    /// Snapshots rendered and handed to HAProxy.
    snapshots: AtomicU64,
    /// `haproxy -sf` runs that succeeded.
    reloads: AtomicU64,
    /// Every daemon pid HAProxy wrote to its pid file, to count them and
    /// to end them all at the end.
    pids: Mutex<Vec<i32>>,
    error: Mutex<Option<String>>,
}

impl Naive {
    /// Follows `directory` with `http` (its token and CA, if any; a timeout
    /// longer than the blocking query's wait).
    pub fn start(directory: &str, http: reqwest::Client, port: u16, run_dir: PathBuf) -> Naive {
        std::fs::create_dir_all(&run_dir).unwrap();
        let state = Arc::new(NaiveState::default());
        let stop = CancellationToken::new();
        let site = Site { bind: format!("127.0.0.1:{port}"), admin_socket: run_dir.join("admin.sock") };
        let task =
            tokio::spawn(naive_loop(directory.to_string(), http, site, run_dir.clone(), state.clone(), stop.clone()));
        Naive { state, stop, task: Some(task), run_dir }
    }

    /// (snapshots rendered, `-sf` runs, daemons HAProxy started).
    pub fn counts(&self) -> (u64, u64, u64) {
        let daemons = self.state.pids.lock().unwrap().len() as u64;
        (self.state.snapshots.load(Ordering::SeqCst), self.state.reloads.load(Ordering::SeqCst), daemons)
    }

    pub fn error(&self) -> Option<String> {
        self.state.error.lock().unwrap().clone()
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        tokio::task::block_in_place(|| self.kill_all());
    }

    /// Ends every HAProxy it started that still runs (by pid, checked
    /// against the command line so a reused pid is never signalled).
    fn kill_all(&self) {
        let mut pids = self.state.pids.lock().map(|p| p.clone()).unwrap_or_default();
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

/// The next snapshot after (epoch, index), and its (epoch, index); a
/// directory from before epochs answers none.
async fn next_snapshot(
    http: &reqwest::Client,
    directory: &str,
    epoch: Option<u64>,
    index: u64,
) -> Result<(Option<u64>, u64, Snapshot), String> {
    let mut url = format!("{directory}/v1/snapshot?index={index}&wait=30s");
    if let Some(epoch) = epoch {
        url.push_str(&format!("&epoch={epoch}"));
    }
    let resp = http.get(url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("GET /v1/snapshot: {status}: {body}"));
    }
    let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("unreadable snapshot: {e}"))?;
    let epoch = json.get("epoch").and_then(|e| e.as_u64());
    let index = json["index"].as_u64().ok_or("a snapshot without an index")?;
    let snapshot = serde_json::from_value(json).map_err(|e| format!("unreadable snapshot: {e}"))?;
    Ok((epoch, index, snapshot))
}

async fn naive_loop(
    directory: String,
    http: reqwest::Client,
    site: Site,
    run_dir: PathBuf,
    state: Arc<NaiveState>,
    stop: CancellationToken,
) {
    let fail = |e: String| *state.error.lock().unwrap() = Some(e);
    let renderer = Renderer::new(None).unwrap();
    let (cfg, pidfile) = (run_dir.join("haproxy.cfg"), run_dir.join("haproxy.pid"));
    let (mut epoch, mut index) = (None, 0);
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            s = next_snapshot(&http, &directory, epoch, index) => s,
        };
        let snapshot = match next {
            Ok((e, i, _)) if (e, i) == (epoch, index) => continue,
            Ok((e, i, s)) => {
                (epoch, index) = (e, i);
                s
            }
            Err(e) => {
                fail(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let text = match renderer.render(&site, &snapshot) {
            // No master-worker, and the port bound by HAProxy itself (sherlock
            // passes its own socket as fd 3; the naive method has none).
            Ok(text) => {
                text.replace("    master-worker\n", "").replace("    bind fd@3\n", &format!("    bind {}\n", site.bind))
            }
            Err(e) => {
                fail(format!("render: {e}"));
                continue;
            }
        };
        // The frontend reads the services map the renderer makes beside it.
        let map = site.services_map();
        let written = dstack::sherlock::render::render_map(&snapshot)
            .map_err(|e| e.to_string())
            .and_then(|m| std::fs::write(&map, m).map_err(|e| e.to_string()));
        if let Err(e) = written {
            fail(format!("writing {}: {e}", map.display()));
            continue;
        }
        if let Err(e) = std::fs::write(&cfg, text) {
            fail(format!("writing {}: {e}", cfg.display()));
            continue;
        }
        let old = std::fs::read_to_string(&pidfile).ok().map(|p| p.trim().to_string()).filter(|p| !p.is_empty());
        let mut cmd = tokio::process::Command::new("haproxy");
        cmd.arg("-f").arg(&cfg).arg("-p").arg(&pidfile).arg("-D");
        if let Some(old) = &old {
            cmd.arg("-sf").arg(old);
        }
        let out = match cmd.stdin(Stdio::null()).kill_on_drop(true).output().await {
            Ok(out) => out,
            Err(e) => {
                fail(format!("running haproxy: {e}"));
                continue;
            }
        };
        if !out.status.success() {
            fail(String::from_utf8_lossy(&out.stderr).to_string());
            continue;
        }
        if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse().ok()) {
            let mut pids = state.pids.lock().unwrap();
            if pids.last() != Some(&pid) {
                pids.push(pid);
            }
        }
        if old.is_some() {
            state.reloads.fetch_add(1, Ordering::SeqCst);
        }
        state.snapshots.fetch_add(1, Ordering::SeqCst);
    }
}
