//! Several directories (README.md, "Several directories"): watsons
//! heartbeat to all, each within its own `--max-ttl`; a sherlock follows
//! the furthest along of those that answer, the first listed of equals, and
//! a switch between directories that hold the same content changes nothing
//! in HAProxy.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// One more directory on a free port, in `dir`, with `args` after its own.
struct Directory {
    port: u16,
    proc: Proc,
    args: Vec<String>,
    dir: std::path::PathBuf,
}

impl Directory {
    fn start(dir: &Path, name: &str, args: &[&str]) -> Directory {
        let port = free_port();
        let state = dir.join(format!("{name}-state"));
        let mut all: Vec<String> =
            vec!["--listen".into(), format!("127.0.0.1:{port}"), "--state-dir".into(), state.to_str().unwrap().into()];
        all.extend(args.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        Directory { port, proc: Proc::start(dir, "directory", &refs), args: all, dir: dir.to_path_buf() }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts it again after a kill, on the same port and state dir.
    fn restart(&mut self) {
        let refs: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.proc = Proc::start(&self.dir, "directory", &refs);
    }

    /// Waits until it answers.
    async fn wait_up(&self, http: &reqwest::Client) {
        eventually(Duration::from_secs(10), "the directory to answer", async || self.get(http, "/v1/status").await)
            .await;
    }

    async fn get(&self, http: &reqwest::Client, path: &str) -> Option<serde_json::Value> {
        http.get(format!("{}{path}", self.url())).send().await.ok()?.json().await.ok()
    }

    async fn metric(&self, http: &reqwest::Client, name: &str) -> u64 {
        let text = http.get(format!("{}/metrics", self.url())).send().await.unwrap().text().await.unwrap();
        metric(&text, name)
    }
}

/// A sherlock following `directories` in order, with its admin endpoint.
struct Sherlock {
    port: u16,
    admin: u16,
    run_dir: std::path::PathBuf,
    _proc: Proc,
}

impl Sherlock {
    async fn start(dir: &Path, directories: &[&str], http: &reqwest::Client) -> Sherlock {
        let (port, admin) = (free_port(), free_port());
        let run_dir = dir.join(format!("sherlock-{port}"));
        let (listen, admin_addr) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{admin}"));
        let mut args = vec!["--listen", &listen, "--admin", &admin_addr, "--name", "multi"];
        let run = run_dir.to_str().unwrap().to_string();
        args.extend(["--run-dir", &run]);
        for d in directories {
            args.extend(["-d", d]);
        }
        let proc = Proc::start(dir, "sherlock", &args);
        let url = format!("http://127.0.0.1:{port}/");
        eventually(Duration::from_secs(15), "sherlock's haproxy to listen", async || http.get(&url).send().await.ok())
            .await;
        Sherlock { port, admin, run_dir, _proc: proc }
    }

    async fn status(&self, http: &reqwest::Client) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}/status", self.admin);
        http.get(url).send().await.unwrap().json().await.unwrap()
    }

    async fn metric(&self, http: &reqwest::Client, name: &str) -> u64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin);
        metric(&http.get(url).send().await.unwrap().text().await.unwrap(), name)
    }

    /// `n` requests through it: answers by instance name, and errors.
    async fn tally(&self, http: &reqwest::Client, n: usize) -> (std::collections::HashMap<String, usize>, usize) {
        let mut counts = std::collections::HashMap::new();
        let mut errors = 0;
        for _ in 0..n {
            match get_via(http, self.port, "/emitter/").await {
                Ok((200, body)) => *counts.entry(body.split(' ').next().unwrap_or("").to_string()).or_default() += 1,
                _ => errors += 1,
            }
        }
        (counts, errors)
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).pool_max_idle_per_host(0).build().unwrap()
}

/// The `ttl_ms` of each instance the directory lists.
async fn ttls(directory: &Directory, http: &reqwest::Client) -> Option<Vec<u64>> {
    let list = directory.get(http, "/v1/instances").await?;
    list.as_array().map(|l| l.iter().filter_map(|i| i["ttl_ms"].as_u64()).collect())
}

/// Regression (issue 10): a watson whose TTL (3 x its period) is over a
/// directory's `--max-ttl` was refused by it forever. The directory now
/// says the largest TTL it takes, and watson heartbeats to it often enough
/// to fit, keeping its own pace with a directory that takes its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watson_heartbeats_within_each_directorys_max_ttl() {
    let tmp = tempfile::tempdir().unwrap();
    let http = http();
    let roomy = Directory::start(tmp.path(), "roomy", &["--max-ttl", "10s"]);
    let strict = Directory::start(tmp.path(), "strict", &["--max-ttl", "2s"]);
    roomy.wait_up(&http).await;
    strict.wait_up(&http).await;
    let instance = Instance::start("vm101").await;
    // Period 3 s: a TTL of 9 s, over the strict directory's 2 s.
    let (a, b) = (roomy.url(), strict.url());
    let watson = Proc::start(tmp.path(), "watson", &["-d", &a, "-d", &b, "emitter", &instance.url("/emitter"), "3"]);
    eventually(Duration::from_secs(15), "the instance in both directories", async || {
        let (r, s) = (ttls(&roomy, &http).await?, ttls(&strict, &http).await?);
        (r.len() == 1 && s.len() == 1).then_some(())
    })
    .await;
    assert_eq!(ttls(&roomy, &http).await.unwrap(), [9000], "its own TTL where it fits");
    assert_eq!(ttls(&strict, &http).await.unwrap(), [2000], "the directory's largest where it does not");
    // Two of the strict directory's TTLs later, it never expired there
    // (before, it was refused there forever).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(ttls(&strict, &http).await.unwrap(), [2000]);
    assert_eq!(strict.metric(&http, "dstack_directory_expiries_total").await, 0);
    assert_eq!(roomy.metric(&http, "dstack_directory_expiries_total").await, 0);
    let log = watson.log_text();
    let adapted: Vec<&str> = log.lines().filter(|l| l.contains("heartbeating to it more often")).collect();
    assert_eq!(adapted.len(), 1, "said once:\n{log}");
    let line = adapted[0];
    assert!(line.contains("WARN") && line.contains(&b) && line.contains("max_ttl=2s"), "{line}");
    assert!(line.contains("heartbeat_every=666ms") && line.contains("check_every=3s"), "{line}");
    assert!(!log.contains("heartbeat failed"), "no heartbeat was refused but the first:\n{log}");
    drop(watson);
}

/// Weights of every server of `backend`, by name, from HAProxy's own
/// runtime state (`show servers state`: name is field 3, weight field 7).
fn weights(run_dir: &Path, backend: &str) -> Vec<(String, String)> {
    let text = socket_command(&run_dir.join("admin.sock"), &format!("show servers state {backend}"));
    let mut list: Vec<(String, String)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(3)?.to_string(), f.get(7)?.to_string()))
        })
        .collect();
    list.sort();
    list
}

/// What HAProxy runs, as the test reads it from HAProxy itself: reloads
/// (`show proc`) and each server's weight.
async fn haproxy_state(run_dir: &Path, backend: &str) -> (u64, Vec<(String, String)>) {
    (show_proc(run_dir).await.reloads, weights(run_dir, backend))
}

/// Waits until `sherlock` follows `directory` and has applied its
/// snapshot (of its own epoch).
async fn wait_for_follow(sherlock: &Sherlock, directory: &Directory, http: &reqwest::Client) {
    let what = format!("sherlock to follow the directory on port {}", directory.port);
    eventually(Duration::from_secs(20), &what, async || {
        let status = sherlock.status(http).await;
        let follows = status["directory"].as_str()?.ends_with(&format!(":{}", directory.port));
        let served = directory.get(http, "/v1/status").await?;
        (follows && status["applied_epoch"] == served["epoch"]).then_some(())
    })
    .await;
}

const ROUTES: &str = "emitter:\n  v1: 70\n  v2: 30\n";

/// Failing over between directories that hold the same commit and the same
/// instances changes nothing in HAProxy: each directory numbers snapshots
/// in its own epoch, and sherlock decides by content, not by ids. Both
/// ways: to the second when the first dies, back to the first once it is
/// restarted and warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_over_between_equal_directories_changes_nothing_in_haproxy() {
    let tmp = tempfile::tempdir().unwrap();
    let http = http();
    let repo = RoutesRepo::new(tmp.path());
    let commit = repo.commit(&[("routes/emitter.yaml", ROUTES)], "emitter 70/30");
    let url = repo.url();
    let directory_args = ["--repo", &url, "--poll", "1s", "--max-ttl", "2s"];
    let mut first = Directory::start(tmp.path(), "first", &directory_args);
    let second = Directory::start(tmp.path(), "second", &directory_args);
    let (a, b) = (first.url(), second.url());
    let sherlock = Sherlock::start(tmp.path(), &[&a, &b], &http).await;
    let run_dir = sherlock.run_dir.clone();
    let mut instances = Vec::new();
    let mut watsons = Vec::new();
    for (n, version) in ["v1", "v1", "v2"].iter().enumerate() {
        let instance = Instance::start(&format!("{version}-{n}")).await;
        let url = instance.url("/emitter");
        let args = ["-d", &a, "-d", &b, "emitter", &url, "0.5", "--version", version];
        watsons.push(Proc::start(tmp.path(), "watson", &args));
        instances.push(instance);
    }
    // Both directories warm, with the commit and all three instances.
    for directory in [&first, &second] {
        eventually(Duration::from_secs(20), "both directories warm with the commit and 3 instances", async || {
            let status = directory.get(&http, "/v1/status").await?;
            let ready = status["warming"] == false
                && status["commit"] == commit.to_string().as_str()
                && status["instances"].as_array()?.len() == 3;
            ready.then_some(())
        })
        .await;
    }
    wait_for_follow(&sherlock, &first, &http).await;
    let before = haproxy_state(&run_dir, "svc_emitter").await;
    assert_eq!(before.1.len(), 3, "{before:?}");
    let commands = sherlock.metric(&http, "dstack_sherlock_runtime_commands_total").await;
    let reloads = sherlock.metric(&http, "dstack_sherlock_reloads_total").await;

    first.proc.kill();
    wait_for_follow(&sherlock, &second, &http).await;
    assert_eq!(haproxy_state(&run_dir, "svc_emitter").await, before, "a failover to an equal directory");
    let (counts, errors) = sherlock.tally(&http, 20).await;
    assert_eq!(errors, 0, "{counts:?}");

    // Back: the first, restarted, is warming and then equal again.
    first.restart();
    wait_for_follow(&sherlock, &first, &http).await;
    assert_eq!(haproxy_state(&run_dir, "svc_emitter").await, before, "back to the first, restarted");
    assert_eq!(sherlock.metric(&http, "dstack_sherlock_runtime_commands_total").await, commands);
    assert_eq!(sherlock.metric(&http, "dstack_sherlock_reloads_total").await, reloads);
    // Each directory lists the sherlock with a snapshot of its own run.
    for directory in [&first, &second] {
        eventually(Duration::from_secs(10), "each directory to see the sherlock converged", async || {
            directory.get(&http, "/v1/status").await.filter(all_applied)
        })
        .await;
    }
    drop(watsons);
}

/// A directory that is behind (its remote still at an older commit of the
/// same branch) is not followed while another answers with a newer one,
/// though it is listed first: commits are ordered by their history's
/// length, which every directory counts alike. Once it catches up, sherlock
/// returns to it (first listed) with nothing changed in HAProxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_that_is_behind_is_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let http = http();
    let repo = RoutesRepo::new(tmp.path());
    let old = repo.commit(&[("routes/emitter.yaml", "emitter: {v1: 100}\n")], "emitter: v1 only");
    // A stale copy of the remote, left at the old commit.
    let stale = tmp.path().join("stale.git");
    let mut opts = git2::RepositoryInitOptions::new();
    opts.bare(true).initial_head("main");
    git2::Repository::init_opts(&stale, &opts).unwrap();
    repo.repo.remote("stale", stale.to_str().unwrap()).unwrap();
    let push_stale = || {
        let mut remote = repo.repo.find_remote("stale").unwrap();
        remote.push(&["refs/heads/main:refs/heads/main"], None).unwrap();
    };
    push_stale();
    let new = repo.commit(&[("routes/emitter.yaml", ROUTES)], "emitter 70/30");

    let (url, stale_url) = (repo.url(), stale.to_str().unwrap().to_string());
    let behind = Directory::start(tmp.path(), "behind", &["--repo", &stale_url, "--poll", "1s", "--max-ttl", "2s"]);
    let current = Directory::start(tmp.path(), "current", &["--repo", &url, "--poll", "1s", "--max-ttl", "2s"]);
    let (a, b) = (behind.url(), current.url());
    let mut instances = Vec::new();
    let mut watsons = Vec::new();
    for (n, version) in ["v1", "v2"].iter().enumerate() {
        let instance = Instance::start(&format!("{version}-{n}")).await;
        let url = instance.url("/emitter");
        let args = ["-d", &a, "-d", &b, "emitter", &url, "0.5", "--version", version];
        watsons.push(Proc::start(tmp.path(), "watson", &args));
        instances.push(instance);
    }
    for (directory, commit) in [(&behind, old), (&current, new)] {
        eventually(Duration::from_secs(20), "each directory warm with its commit and 2 instances", async || {
            let status = directory.get(&http, "/v1/status").await?;
            let ready = status["warming"] == false
                && status["commit"] == commit.to_string().as_str()
                && status["instances"].as_array()?.len() == 2;
            ready.then_some(())
        })
        .await;
    }
    let sherlock = Sherlock::start(tmp.path(), &[&a, &b], &http).await;
    wait_for_follow(&sherlock, &current, &http).await;
    let status = sherlock.status(&http).await;
    assert_eq!(status["applied_commit"], new.to_string().as_str(), "{status}");
    let (counts, errors) = sherlock.tally(&http, 40).await;
    assert_eq!(errors, 0);
    assert!(by_version(&counts).get("v2").is_some_and(|n| *n > 0), "the new commit's weights: {counts:?}");
    let run_dir = sherlock.run_dir.clone();
    let before = haproxy_state(&run_dir, "svc_emitter").await;

    // The stale remote catches up: the first listed is current again.
    push_stale();
    wait_for_follow(&sherlock, &behind, &http).await;
    assert_eq!(sherlock.status(&http).await["applied_commit"], new.to_string().as_str());
    assert_eq!(haproxy_state(&run_dir, "svc_emitter").await, before, "equal content: nothing changes");
    drop(watsons);
}
