//! Hitless: instance churn and weight changes go through HAProxy's Runtime
//! API with no reload and no failed request under load; a new service needs
//! a reload, which is seamless.

mod common;

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// `show proc` on the master CLI: (reload count, current worker pids).
fn show_proc(run_dir: &Path) -> (u64, Vec<u32>) {
    let mut s = std::os::unix::net::UnixStream::connect(run_dir.join("master.sock")).unwrap();
    s.write_all(b"show proc\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let state = dstack::sherlock::haproxy::parse_show_proc(&text).unwrap();
    (state.reloads, state.workers)
}

/// Keep-alive clients hammering `path` until stopped; (ok, failed).
struct Load {
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, path: &'static str, clients: usize) -> Load {
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let tasks = (0..clients)
            .map(|_| {
                let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
                tokio::spawn(async move {
                    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
                    while !stop.is_cancelled() {
                        match get_via(&http, port, path).await {
                            Ok((200, _)) => ok.fetch_add(1, Ordering::SeqCst),
                            other => {
                                eprintln!("failed request: {other:?}");
                                failed.fetch_add(1, Ordering::SeqCst)
                            }
                        };
                    }
                })
            })
            .collect();
        Load { ok, failed, stop, tasks }
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        (self.ok.load(Ordering::SeqCst), self.failed.load(Ordering::SeqCst))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_and_weight_changes_under_load_need_no_reload_and_fail_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let first = repo.commit(&[("routes/barker.yaml", "barker: {v1: 100, v2: 0}\n")], "v2 staged");
    let url = repo.url();
    let cluster = Cluster::start_with(&["--repo", &url, "--poll", "1h"]).await;
    let (mut instances, mut watsons) = cluster.fleet("barker", &["v1", "v1", "v1", "v2"]).await;
    cluster.wait_for_instances("barker", 4).await;
    cluster.wait_until_warm().await;
    let _ = first;
    let run_dir = cluster.dir.path().join(format!("sherlock-{}", cluster.sherlock_port));
    let before = show_proc(&run_dir);

    let load = Load::start(cluster.sherlock_port, "/barker/", 4);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // An instance dies (its connections with it).
    instances[0].kill().await;
    cluster.wait_for_instances("barker", 3).await;
    // One is added.
    let added = Instance::start("v1-4").await;
    let _added_watson = cluster.watson("barker", &added.url("/barker"), &["--version", "v1"]);
    cluster.wait_for_instances("barker", 4).await;
    // One deregisters (its watson stops) and is drained.
    watsons[1].stop();
    cluster.wait_for_instances("barker", 3).await;
    // The canary weights change in git.
    let canary = repo.commit(&[("routes/barker.yaml", "barker: {v1: 80, v2: 20}\n")], "canary 20%");
    let answer: serde_json::Value = cluster
        .http
        .post(format!("{}/v1/reconcile", cluster.directory_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["commit"], canary.to_string());
    cluster.wait_for_instances("barker", 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (ok, failed) = load.finish().await;
    assert_eq!(failed, 0, "failed requests under churn ({ok} ok)");
    assert!(ok > 200, "the load ran: {ok}");
    let after = show_proc(&run_dir);
    assert_eq!(after, before, "no reload and no new worker (reloads, workers) for instance and weight changes");
    let (counts, _) = cluster.tally("/barker/", 100).await;
    let v2 = *by_version(&counts).get("v2").unwrap_or(&0);
    assert!((18..=22).contains(&v2), "the new weights are in force at run time: {counts:?}");
    let sherlock_log = cluster.sherlock.as_ref().unwrap().log_text();
    assert!(sherlock_log.contains("applied through the runtime api"), "{sherlock_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_service_under_load_reloads_seamlessly() {
    let cluster = Cluster::start().await;
    let a = Instance::start("v1-0").await;
    let b = Instance::start("v1-1").await;
    let _wa = cluster.watson("barker", &a.url("/barker"), &[]);
    let _wb = cluster.watson("barker", &b.url("/barker"), &[]);
    cluster.wait_for_instances("barker", 2).await;
    cluster.wait_until_warm().await;
    let run_dir = cluster.dir.path().join(format!("sherlock-{}", cluster.sherlock_port));
    let (reloads, workers) = show_proc(&run_dir);

    let load = Load::start(cluster.sherlock_port, "/barker/", 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = Instance::start("fresh").await;
    let _wf = cluster.watson("newsvc", &fresh.url(""), &[]);
    cluster.wait_for_instances("newsvc", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = load.finish().await;

    assert_eq!(failed, 0, "failed requests across the reload ({ok} ok)");
    let (reloads_after, workers_after) = show_proc(&run_dir);
    assert_eq!(reloads_after, reloads + 1, "a new service is one reload");
    assert_ne!(workers_after, workers, "a new worker took over");
    assert_eq!(cluster.get("/newsvc/x").await.unwrap(), (200, "fresh /x".to_string()));
}
