//! The directory and its git remote under faults: a restart while the
//! remote is away serves the last good commit from the mirror; a git server
//! that accepts and never answers stalls neither webhooks nor shutdown; a
//! force-push that rewinds the branch and a commit that removes every
//! route are refused unless asked for.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Commits the removal of `paths` (and nothing else) and pushes it.
fn commit_removal(repo: &RoutesRepo, paths: &[&str], message: &str) -> git2::Oid {
    for path in paths {
        std::fs::remove_file(repo.work.join(path)).unwrap();
    }
    let mut index = repo.repo.index().unwrap();
    index.update_all(["*"], None).unwrap();
    index.write().unwrap();
    let tree = repo.repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = repo.repo.signature().unwrap();
    let head = repo.repo.head().unwrap().peel_to_commit().unwrap();
    let oid = repo.repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &[&head]).unwrap();
    repo.push();
    oid
}

/// Moves the work clone's `main` to `commit` and force-pushes it.
fn force_push(repo: &RoutesRepo, commit: git2::Oid) {
    let target = repo.repo.find_object(commit, None).unwrap();
    repo.repo.reset(&target, git2::ResetType::Hard, None).unwrap();
    let mut remote = repo.repo.find_remote("origin").unwrap();
    remote.push(&["+refs/heads/main:refs/heads/main"], None).unwrap();
}

/// A directory alone (no sherlock) on a free port in `dir`.
struct Directory {
    url: String,
    proc: Proc,
    http: reqwest::Client,
}

impl Directory {
    async fn start(dir: &std::path::Path, extra: &[&str]) -> Directory {
        let (url, proc) = lone_directory(dir, extra).await;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        Directory { url, proc, http }
    }

    async fn status(&self) -> Value {
        self.http.get(format!("{}/v1/status", self.url)).send().await.unwrap().json().await.unwrap()
    }

    /// Waits until the routes state satisfies `check`; the status.
    async fn wait_for(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        eventually(Duration::from_secs(15), what, async || {
            let status = self.status().await;
            check(&status).then_some(status)
        })
        .await
    }

    fn dw_status(&self) -> String {
        let (code, out, err) = run_dw(&["-d", &self.url, "status"], None);
        assert_eq!(code, 0, "{out}{err}");
        out
    }
}

fn rejected(status: &Value) -> (&str, &str) {
    let r = &status["routes"]["rejected"];
    (r["commit"].as_str().unwrap_or(""), r["kind"].as_str().unwrap_or(""))
}

/// A TCP server that accepts every connection, holds it open and never
/// sends a byte: a hung git server. Counts the connections.
async fn silent_server() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (port, accepted)
}

/// Restarts the cluster's directory with its remote moved away, checks it
/// serves `good` at once, says it is stale, and sends traffic as `good`
/// says once the watsons are back; then puts the remote back.
async fn restart_with_the_remote_away(cluster: &mut Cluster, repo: &RoutesRepo, good: git2::Oid) {
    let moved = repo.remote.with_extension("moved");
    std::fs::rename(&repo.remote, &moved).unwrap();
    cluster.restart_directory().await;
    let status = cluster.status().await;
    assert_eq!(status["commit"], good.to_string(), "the mirror's commit in force, before any fetch: {status}");
    assert_eq!(status["routes"]["commit"], good.to_string(), "{status}");
    let stale = status["routes"]["stale"].as_str().unwrap_or_else(|| panic!("no stale: {status}"));
    assert!(stale.starts_with("not fetched since start"), "{stale}");
    assert_eq!(status["desired"]["routes"]["barker"]["weights"]["v2"], 100, "{status}");
    let (code, out, err) = cluster.dw(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    let serving = out.lines().find(|l| l.trim_start().starts_with("serving")).unwrap_or_else(|| panic!("{out}"));
    assert!(serving.contains(&good.to_string()[..7]) && serving.contains("not fetched since start"), "{out}");

    // The fetch fails (reported), and traffic follows the commit in force
    // once the watsons have re-registered.
    cluster.wait_for_instances("barker", 2).await;
    let status = eventually(Duration::from_secs(10), "the fetch error", async || {
        let status = cluster.status().await;
        status["routes"]["error"].as_str().is_some_and(|e| e.contains("fetching")).then_some(status)
    })
    .await;
    assert_eq!(status["commit"], good.to_string(), "{status}");
    assert!(status["routes"]["stale"].is_string(), "still not fetched: {status}");
    // The error is news in a snapshot of its own: the sherlock applies it.
    eventually(Duration::from_secs(10), "the sherlock to apply the snapshot served", async || {
        all_applied(&cluster.status().await).then_some(())
    })
    .await;
    let (counts, errors) = cluster.tally("/barker/", 10).await;
    assert_eq!((by_version(&counts).get("v2"), errors), (Some(&10), 0), "v2 alone, as in git: {counts:?}");

    // The remote is back: a fetch clears `stale`.
    std::fs::rename(&moved, &repo.remote).unwrap();
    eventually(Duration::from_secs(15), "a fetch after the remote is back", async || {
        let status = cluster.status().await;
        (status["routes"]["stale"].is_null() && status["routes"]["error"].is_null()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_restarted_while_its_remote_is_away_serves_the_last_good_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let good = repo.commit(&[("routes/barker.yaml", "barker: {v1: 0, v2: 100}\n")], "all on v2");
    let url = repo.url();
    let mut cluster = Cluster::start_with(&["--repo", &url, "--poll", "200ms"]).await;
    let (_instances, _watsons) = cluster.fleet("barker", &["v1", "v2"]).await;
    cluster.wait_for_instances("barker", 2).await;
    cluster.wait_for_commit(good).await;
    restart_with_the_remote_away(&mut cluster, &repo, good).await;
    assert_eq!(cluster.status().await["commit"], good.to_string());

    // A head the directory refuses (it is valid, and served it would send
    // traffic to every version alike): the restarted directory serves the
    // last commit it accepted, not the branch head.
    let emptied = commit_removal(&repo, &["routes/barker.yaml"], "remove every route");
    eventually(Duration::from_secs(15), "the emptying commit rejected", async || {
        let status = cluster.status().await;
        (rejected(&status) == (emptied.to_string().as_str(), "empty")).then_some(())
    })
    .await;
    restart_with_the_remote_away(&mut cluster, &repo, good).await;
    let status = cluster.status().await;
    assert_eq!(rejected(&status), (emptied.to_string().as_str(), "empty"), "refused again: {status}");
    assert_eq!(status["commit"], good.to_string(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_removes_every_route_is_refused_without_its_trailer() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let first = repo.commit(
        &[("routes/barker.yaml", "barker: {v1: 100}\n"), ("routes/emitter.yaml", "emitter: {v1: 100}\n")],
        "two services",
    );
    let url = repo.url();
    let directory = Directory::start(tmp.path(), &["--repo", &url, "--poll", "200ms"]).await;
    directory.wait_for("the first commit", |s| s["commit"] == first.to_string().as_str()).await;

    let emptied =
        commit_removal(&repo, &["routes/barker.yaml", "routes/emitter.yaml"], "clean up\n\nAll of it, by mistake.\n");
    let status = directory.wait_for("the emptying commit rejected", |s| !s["routes"]["rejected"].is_null()).await;
    assert_eq!(rejected(&status), (emptied.to_string().as_str(), "empty"), "{status}");
    let error = status["routes"]["rejected"]["errors"][0].as_str().unwrap();
    assert!(error.contains("removes every route") && error.contains("Dstack-Allow-Empty: yes"), "{error}");
    assert_eq!(status["commit"], first.to_string(), "the last good commit stays in force: {status}");
    assert_eq!(status["desired"]["routes"].as_object().map(|r| r.len()), Some(2), "{status}");
    let out = directory.dw_status();
    let line = out.lines().find(|l| l.contains("REJECTED")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains(&emptied.to_string()[..7]) && line.contains("removes every route"), "{out}");

    // The same removal, meant: its message carries the trailer.
    let meant = commit_removal(&repo, &[], "retire every service\n\nDstack-Allow-Empty: yes\n");
    let status = directory.wait_for("the meant removal in force", |s| s["commit"] == meant.to_string().as_str()).await;
    assert!(status["routes"]["rejected"].is_null(), "{status}");
    assert_eq!(status["desired"]["routes"].as_object().map(|r| r.len()), Some(0), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_push_that_rewinds_the_branch_is_refused_until_history_moves_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let old = repo.commit(&[("routes/barker.yaml", "barker: {v1: 100}\n")], "v1");
    let url = repo.url();
    let directory = Directory::start(tmp.path(), &["--repo", &url, "--poll", "200ms"]).await;
    let current = repo.commit(&[("routes/barker.yaml", "barker: {v1: 0, v2: 100}\n")], "v2");
    directory.wait_for("the second commit", |s| s["commit"] == current.to_string().as_str()).await;

    // Someone force-pushes the branch back to the old commit.
    force_push(&repo, old);
    let status = directory.wait_for("the rewind rejected", |s| !s["routes"]["rejected"].is_null()).await;
    assert_eq!(rejected(&status), (old.to_string().as_str(), "rewind"), "{status}");
    let error = status["routes"]["rejected"]["errors"][0].as_str().unwrap();
    assert!(error.contains("does not descend from") && error.contains("--allow-rewind"), "{error}");
    assert_eq!(status["commit"], current.to_string(), "{status}");
    let out = directory.dw_status();
    assert!(out.lines().any(|l| l.contains("REJECTED") && l.contains("history moved back")), "{out}");

    // A new commit on the rewound branch is still behind the commit in force.
    let sideways = repo.commit(&[("routes/barker.yaml", "barker: {v1: 50, v2: 50}\n")], "half and half");
    let status = directory.wait_for("the sideways commit rejected", |s| rejected(s).0 == sideways.to_string()).await;
    assert_eq!(rejected(&status).1, "rewind", "{status}");
    assert_eq!(status["commit"], current.to_string(), "{status}");

    // Back to the commit in force, then forward of it: accepted again.
    force_push(&repo, current);
    directory.wait_for("the rejection cleared", |s| s["routes"]["rejected"].is_null()).await;
    let forward = repo.commit(&[("routes/barker.yaml", "barker: {v1: 10, v2: 90}\n")], "forward");
    let status = directory.wait_for("the forward commit", |s| s["commit"] == forward.to_string().as_str()).await;
    assert!(status["routes"]["rejected"].is_null(), "{status}");

    // A directory started with --allow-rewind takes a rewind.
    let allowing = Directory::start(tmp.path(), &["--repo", &url, "--poll", "200ms", "--allow-rewind"]).await;
    allowing.wait_for("the head", |s| s["commit"] == forward.to_string().as_str()).await;
    force_push(&repo, old);
    let status = allowing.wait_for("the rewind accepted", |s| s["commit"] == old.to_string().as_str()).await;
    assert!(status["routes"]["rejected"].is_null(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_server_that_never_answers_stalls_neither_webhooks_nor_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, accepted) = silent_server().await;
    let url = format!("http://127.0.0.1:{port}/routes.git");
    // The fetch timeout (60 s by default) is longer than this test: only
    // the bounds on the reconciler's answers and on shutdown end it in time.
    let mut directory = Directory::start(tmp.path(), &["--repo", &url, "--poll", "1h"]).await;
    eventually(Duration::from_secs(10), "the first fetch to connect", async || {
        (accepted.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    // Long enough that a webhook is not asked to wait for the next fetch.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let status = directory.status().await;
    assert!(status["routes"]["error"].is_null(), "no answer is no error yet: {status}");

    let started = Instant::now();
    let resp = directory.http.post(format!("{}/v1/reconcile", directory.url)).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 202, "a fetch is in progress");
    let answer: Value = resp.json().await.unwrap();
    assert!(answer["fetching_since"].is_string(), "{answer}");
    assert_eq!(answer["fetching_since"], status["routes"]["fetching_since"], "{answer}");
    assert!(took < Duration::from_secs(5), "answered at once, not after the fetch: {took:?}");
    let out = directory.dw_status();
    assert!(out.contains("fetching  since"), "{out}");

    let started = Instant::now();
    let exit = directory.proc.stop();
    assert!(exit.success(), "{exit:?}");
    assert!(started.elapsed() < Duration::from_secs(8), "SIGTERM ended it within its deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_from_a_hung_git_server_is_given_up_at_its_timeout_and_retried() {
    let tmp = tempfile::tempdir().unwrap();
    for scheme in ["http", "git"] {
        let (port, accepted) = silent_server().await;
        let url = format!("{scheme}://127.0.0.1:{port}/routes.git");
        let directory =
            Directory::start(tmp.path(), &["--repo", &url, "--poll", "200ms", "--fetch-timeout", "1s"]).await;
        let status = directory
            .wait_for(&format!("the {scheme} fetch given up"), |s| s["routes"]["error"].as_str().is_some())
            .await;
        let error = status["routes"]["error"].as_str().unwrap();
        assert!(error.contains(&format!("fetching branch main from {url}")), "{error}");
        // Given up, and tried again (with backoff) rather than stuck.
        eventually(Duration::from_secs(15), "a retry", async || (accepted.load(Ordering::SeqCst) >= 2).then_some(()))
            .await;
        let status = directory.status().await;
        assert!(status["commit"].is_null(), "{status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_that_did_not_run_for_longer_than_a_ttl_expires_no_instance() {
    let cluster = Cluster::start().await;
    let (_instances, _watsons) = cluster.fleet("barker", &["v1", "v2"]).await;
    cluster.wait_for_instances("barker", 2).await;
    let expiries = cluster.directory_metric("dstack_directory_expiries_total").await;

    // Stopped for longer than the watsons' TTL (3 s): their heartbeats wait
    // in the socket queue, and are read after the publisher's first pass.
    cluster.directory.signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.directory.signal(libc::SIGCONT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cluster.directory_metric("dstack_directory_expiries_total").await,
        expiries,
        "instances expired for heartbeats the directory could not hear"
    );
    assert_eq!(cluster.status().await["instances"].as_array().unwrap().len(), 2);
}
