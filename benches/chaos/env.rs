//! The cluster the faults are played on, all on loopback in one temp dir:
//! a routes repo served over http://, a directory (a second one for the
//! failover fault), four instances of `barker` (v1-a, v1-b at 90 %, v2-a,
//! v2-b at 10 %), each a process of its own with its watson, and a
//! sherlock whose run dir is a small tmpfs (so the disk can fill up).
//! Every process is ended when the `Cluster` drops, panics included.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{free_port, haproxy_pids, parse_show_proc, try_socket_command, Proc, RoutesRepo};
use crate::gitserver::GitServer;

pub const SERVICE: &str = "barker";
pub const BACKEND: &str = "svc_barker";
/// watson's period (s) and the directory's `--max-ttl` (3 periods).
pub const PERIOD: &str = "1";
pub const MAX_TTL: &str = "3s";
/// Instances: name, version. Two per version, so that losing one leaves
/// its version served.
pub const INSTANCES: [(&str, &str); 4] = [("v1-a", "v1"), ("v1-b", "v1"), ("v2-a", "v2"), ("v2-b", "v2")];
/// Where the run dir's tmpfs ends: small enough to fill in a moment.
const RUN_DIR_SIZE: &str = "4m";

pub type Weights = BTreeMap<String, u32>;

pub fn weights(pairs: &[(&str, u32)]) -> Weights {
    pairs.iter().map(|(v, w)| (v.to_string(), *w)).collect()
}

pub fn routes_yaml(w: &Weights) -> String {
    let body: Vec<String> = w.iter().map(|(v, n)| format!("  {v}: {n}")).collect();
    format!("{SERVICE}:\n{}\n", body.join("\n"))
}

/// The version of an HAProxy server name (`barker-v1-<hash>`).
pub fn version_of(server: &str) -> Option<&str> {
    server.strip_prefix(&format!("{SERVICE}-"))?.rsplit_once('-').map(|(v, _)| v)
}

/// A service instance in a process of its own (this binary, re-executed),
/// so that it can be SIGKILLed and SIGSTOPped for real; SIGUSR1 makes it
/// answer 5 s late, SIGUSR2 on time again. Killed (SIGCONT, SIGKILL) when dropped.
pub struct InstanceProc {
    pub name: &'static str,
    pub version: &'static str,
    pub port: u16,
    child: Option<Child>,
}

impl InstanceProc {
    fn spawn(name: &'static str, version: &'static str, port: u16) -> InstanceProc {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([crate::INSTANCE_FLAG, name, &port.to_string()]).stdin(Stdio::null()).stdout(Stdio::null());
        // SAFETY: prctl is async-signal-safe. The instance goes with the bench, whatever ends it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("re-executing the bench as an instance");
        InstanceProc { name, version, port, child: Some(child) }
    }

    pub async fn start(name: &'static str, version: &'static str, port: u16) -> InstanceProc {
        let instance = InstanceProc::spawn(name, version, port);
        instance.wait_listening().await;
        instance
    }

    async fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "instance {} did not listen on {}", self.name, self.port);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/{SERVICE}", self.port)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(child) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, sig) };
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it again on its port (after [`InstanceProc::kill`]).
    pub async fn restart(&mut self) {
        self.kill();
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut fresh = InstanceProc::spawn(self.name, self.version, port);
            tokio::time::sleep(Duration::from_millis(100)).await;
            // It exits at once when the port is not free yet.
            if fresh.child.as_mut().unwrap().try_wait().unwrap().is_none() {
                fresh.wait_listening().await;
                *self = fresh;
                return;
            }
            fresh.child = None;
            assert!(Instant::now() < deadline, "instance {} cannot bind {port} again", self.name);
        }
    }
}

impl Drop for InstanceProc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill();
    }
}

/// A tmpfs mounted on a dir; unmounted (lazily) when dropped.
pub struct Mount {
    pub path: PathBuf,
}

impl Mount {
    fn tmpfs(path: &Path, size: &str) -> Result<Mount, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Mount { path: path.to_path_buf() })
    }

    /// `mount -o remount,ro` or `rw`.
    pub fn remount(&self, how: &str) -> Result<(), String> {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{how}")])
            .arg(&self.path)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A directory process that can be killed and started again as it was.
pub struct DirectoryNode {
    pub port: u16,
    args: Vec<String>,
    pub proc: Option<Proc>,
}

impl DirectoryNode {
    fn new(dir: &Path, tag: &str, repo: &str) -> DirectoryNode {
        let port = free_port();
        let state = dir.join(format!("{tag}-state"));
        let args = [
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--max-ttl",
            MAX_TTL,
            "--state-dir",
            state.to_str().unwrap(),
            "--repo",
            repo,
            "--poll",
            "1s",
        ];
        DirectoryNode { port, args: args.iter().map(|a| a.to_string()).collect(), proc: None }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn start(&mut self, dir: &Path) {
        assert!(self.proc.is_none(), "directory on {} already runs", self.port);
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.proc = Some(Proc::start(dir, "directory", &args));
    }

    pub fn signal(&self, sig: i32) {
        if let Some(p) = &self.proc {
            p.signal(sig);
        }
    }

    pub fn sigkill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM, and how long it took to exit; SIGKILL after `limit` (then Err).
    pub fn sigterm(&mut self, limit: Duration) -> Result<Duration, Duration> {
        let Some(mut p) = self.proc.take() else { return Ok(Duration::ZERO) };
        let mut child = p.child.take().unwrap();
        let t0 = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        while t0.elapsed() < limit {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(t0.elapsed())
    }

    pub fn log_tail(&self) -> String {
        self.proc.as_ref().map(|p| tail(&p.log_text(), 15)).unwrap_or_default()
    }
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub struct Cluster {
    // Declared in the order they must end: sherlock (and its HAProxy)
    // first, the temp dir last.
    pub sherlock: Option<Proc>,
    pub watsons: Vec<Option<Proc>>,
    pub instances: Vec<InstanceProc>,
    pub d1: DirectoryNode,
    pub d2: DirectoryNode,
    pub git: GitServer,
    pub run_mount: Option<Mount>,
    /// Why the run dir is not a tmpfs, when it is not.
    pub mount_error: Option<String>,
    /// The routes repo's bare remote and working clone (a git2 handle is
    /// not `Sync`: each use opens its own, see [`Cluster::repo`]).
    repo_paths: (PathBuf, PathBuf),
    pub http: reqwest::Client,
    pub sherlock_port: u16,
    pub admin_port: u16,
    pub run_dir: PathBuf,
    /// The commit the directory should hold in force, and its weights.
    pub good: (git2::Oid, Weights),
    /// Each instance's id (its HAProxy server name), by instance.
    pub ids: Vec<String>,
    pub tmp: tempfile::TempDir,
}

/// The routes of the cluster at rest.
pub fn base_weights() -> Weights {
    weights(&[("v1", 90), ("v2", 10)])
}

impl Cluster {
    pub async fn start() -> Cluster {
        let tmp = tempfile::Builder::new().prefix("dstack-chaos").tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let repo = RoutesRepo::new(&dir);
        let base = base_weights();
        let first = repo.commit(&[("routes/barker.yaml", &routes_yaml(&base))], "barker: v1 90, v2 10");
        let git = GitServer::start(dir.clone()).await;
        let url = git.url("routes-remote.git");
        let mut d1 = DirectoryNode::new(&dir, "d1", &url);
        let d2 = DirectoryNode::new(&dir, "d2", &url);
        d1.start(&dir);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();

        let sherlock_port = free_port();
        let run_dir = dir.join(format!("sherlock-{sherlock_port}"));
        let (run_mount, mount_error) = match Mount::tmpfs(&run_dir, RUN_DIR_SIZE) {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(e)),
        };
        let mut cluster = Cluster {
            sherlock: None,
            watsons: Vec::new(),
            instances: Vec::new(),
            d1,
            d2,
            git,
            run_mount,
            mount_error,
            repo_paths: (repo.remote.clone(), repo.work.clone()),
            http,
            sherlock_port,
            admin_port: free_port(),
            run_dir,
            good: (first, base),
            ids: Vec::new(),
            tmp,
        };
        cluster.wait_directory(&cluster.d1.url(), Duration::from_secs(15)).await.expect("the directory starts");
        for (name, version) in INSTANCES {
            let instance = InstanceProc::start(name, version, free_port()).await;
            cluster.instances.push(instance);
            let w = cluster.start_watson(cluster.instances.len() - 1);
            cluster.watsons.push(Some(w));
        }
        cluster.start_sherlock();
        cluster.ids = cluster.learn_ids().await;
        cluster
    }

    /// The instances' ids, as the directory lists them.
    async fn learn_ids(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(status) = self.status(&self.d1.url()).await {
                let listed = status["instances"].as_array().cloned().unwrap_or_default();
                let ids: Vec<Option<String>> = self
                    .instances
                    .iter()
                    .map(|i| {
                        let url = i.url();
                        listed
                            .iter()
                            .find(|l| l["url"] == url.as_str())
                            .and_then(|l| l["id"].as_str())
                            .map(String::from)
                    })
                    .collect();
                if ids.iter().all(Option::is_some) {
                    return ids.into_iter().flatten().collect();
                }
            }
            assert!(Instant::now() < deadline, "the directory does not list the 4 instances:\n{}", self.d1.log_tail());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The routes repo, opened for one use.
    pub fn repo(&self) -> RoutesRepo {
        let (remote, work) = self.repo_paths.clone();
        let repo = git2::Repository::open(&work).unwrap();
        RoutesRepo { remote, work, repo }
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    pub fn start_watson(&self, i: usize) -> Proc {
        let inst = &self.instances[i];
        let (d1, d2, url) = (self.d1.url(), self.d2.url(), inst.url());
        let args = ["-d", &d1, "-d", &d2, SERVICE, &url, PERIOD, "--version", inst.version];
        Proc::start(self.dir(), "watson", &args)
    }

    pub fn start_sherlock(&mut self) {
        let (d1, d2) = (self.d1.url(), self.d2.url());
        let listen = format!("127.0.0.1:{}", self.sherlock_port);
        let admin = format!("127.0.0.1:{}", self.admin_port);
        let run = self.run_dir.to_str().unwrap().to_string();
        let args = ["-d", &d1, "-d", &d2, "--listen", &listen, "--run-dir", &run, "--name", "chaos", "--admin", &admin];
        self.sherlock = Some(Proc::start(self.tmp.path(), "sherlock", &args));
    }

    /// Waits until a directory answers `/v1/status`.
    pub async fn wait_directory(&self, base: &str, limit: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        loop {
            if self.get_json(&format!("{base}/v1/status")).await.is_ok() {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > limit {
                return Err(format!("no answer from {base} in {limit:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn get_json(&self, url: &str) -> Result<Value, String> {
        let resp = self.http.get(url).timeout(Duration::from_secs(2)).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("{url}: {}", resp.status()));
        }
        resp.json().await.map_err(|e| e.to_string())
    }

    pub async fn status(&self, base: &str) -> Result<Value, String> {
        self.get_json(&format!("{base}/v1/status")).await
    }

    pub async fn sherlock_status(&self) -> Result<Value, String> {
        self.get_json(&format!("http://127.0.0.1:{}/status", self.admin_port)).await
    }

    pub async fn sherlock_metrics(&self) -> Result<String, String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin_port);
        let resp = self.http.get(url).timeout(Duration::from_secs(2)).send().await.map_err(|e| e.to_string())?;
        resp.text().await.map_err(|e| e.to_string())
    }

    /// `POST /v1/reconcile` on a directory, with a bound of our own: the
    /// status and body, or why there was none.
    pub async fn reconcile(&self, base: &str, limit: Duration) -> (Duration, Result<String, String>) {
        let t0 = Instant::now();
        let sent = self.http.post(format!("{base}/v1/reconcile")).timeout(limit).send().await;
        let answer = match sent {
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                Ok(format!("{status} {text}"))
            }
            Err(e) if e.is_timeout() => Err(format!("no answer in {limit:?}")),
            Err(e) => Err(e.to_string()),
        };
        (t0.elapsed(), answer)
    }

    /// Commits routes (and other files), pushes, and asks the directory to
    /// fetch (not waiting for its answer: a hanging remote must not stall the suite).
    pub fn push(&self, files: &[(&str, &str)], message: &str) -> git2::Oid {
        let oid = self.repo().commit(files, message);
        self.poke();
        oid
    }

    /// A reconcile request in the background.
    pub fn poke(&self) {
        for base in [self.d1.url(), self.d2.url()] {
            let http = self.http.clone();
            tokio::spawn(async move {
                let _ = http.post(format!("{base}/v1/reconcile")).timeout(Duration::from_secs(5)).send().await;
            });
        }
    }

    /// Force-pushes local commit `oid` as the remote's `main`.
    pub fn force_push(&self, oid: git2::Oid) {
        let routes = self.repo();
        let repo = &routes.repo;
        repo.reference("refs/heads/chaos-push", oid, true, "chaos").unwrap();
        let mut remote = repo.find_remote("origin").unwrap();
        remote.push(&["+refs/heads/chaos-push:refs/heads/main"], None).unwrap();
        self.poke();
    }

    /// Commits the removal of `path`, and pushes.
    pub fn push_removal(&self, path: &str, message: &str) -> git2::Oid {
        let routes = self.repo();
        let repo = &routes.repo;
        std::fs::remove_file(routes.work.join(path)).unwrap();
        let mut index = repo.index().unwrap();
        index.remove_path(Path::new(path)).unwrap();
        index.write().unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = repo.signature().unwrap();
        let head = repo.head().unwrap().peel_to_commit().unwrap();
        let oid = repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &[&head]).unwrap();
        routes.push();
        self.poke();
        oid
    }

    /// HAProxy's master pid and current workers (`show proc`).
    pub fn haproxy_procs(&self) -> Option<(i32, Vec<u32>)> {
        let text = try_socket_command(&self.run_dir.join("master.sock"), "show proc").ok()?;
        let master = text.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"master")).then(|| f[0].parse::<i32>().ok()).flatten()
        })?;
        Some((master, parse_show_proc(&text)?.workers))
    }

    /// SIGKILLs every HAProxy of the run dir (the last of the cleanup, and
    /// an orphan's end): found by pid, their command line naming our run dir.
    pub fn kill_haproxies(&self) {
        for pid in haproxy_pids(&self.run_dir) {
            // SAFETY: processes started on our behalf (their command line names our temp dir).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.sherlock.take();
        self.kill_haproxies();
        self.watsons.clear();
        self.instances.clear();
        self.d1.signal(libc::SIGCONT);
        self.d2.signal(libc::SIGCONT);
        self.d1.proc.take();
        self.d2.proc.take();
        self.git.release();
        if let Some(m) = &self.run_mount {
            let _ = m.remount("rw");
        }
        self.run_mount.take();
    }
}
