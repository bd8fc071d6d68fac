//! Hitless: instance churn and weight changes go through HAProxy's Runtime
//! API with no reload and no failed request under load; a new service needs
//! a reload, which is seamless; `--apply-mode reload` reloads for every
//! change; a drained server is deleted once its connections end. Reloads
//! are counted from HAProxy's master (`show proc`), not only by sherlock.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use common::*;

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

    /// Waits until `n` more requests have succeeded.
    async fn wait_for_more(&self, n: usize) {
        let target = self.ok.load(Ordering::SeqCst) + n;
        eventually(Duration::from_secs(10), "the load to make progress", async || {
            (self.ok.load(Ordering::SeqCst) >= target).then_some(())
        })
        .await;
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
    repo.commit(&[("routes/barker.yaml", "barker: {v1: 100, v2: 0}\n")], "v2 staged");
    let url = repo.url();
    let cluster = Cluster::start_with(&["--repo", &url, "--poll", "1h"]).await;
    let (mut instances, mut watsons) = cluster.fleet("barker", &["v1", "v1", "v1", "v2"]).await;
    cluster.wait_for_instances("barker", 4).await;
    cluster.wait_until_warm().await;
    let port = cluster.sherlock_port;
    let run_dir = cluster.run_dir(port);
    let before = show_proc(&run_dir).await;
    let reloads_before = cluster.sherlock_metric(port, "dstack_sherlock_reloads_total").await;
    let runtime_before = cluster.sherlock_metric(port, "dstack_sherlock_runtime_applies_total").await;

    let load = Load::start(cluster.sherlock_port, "/barker/", 4);
    load.wait_for_more(50).await;

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
    let answer = cluster.reconcile().await;
    assert_eq!(answer["commit"], canary.to_string());
    cluster.wait_for_commit(canary).await;
    load.wait_for_more(50).await;

    let (ok, failed) = load.finish().await;
    assert_eq!(failed, 0, "failed requests under churn ({ok} ok)");
    assert!(ok > 200, "the load ran: {ok}");
    // "No reload" as HAProxy's master tells it, not only as sherlock counts.
    let after = show_proc(&run_dir).await;
    assert_eq!(after.reloads, before.reloads, "haproxy's master reloaded for instance and weight changes");
    assert_eq!(after.workers, before.workers, "a new worker took over: {before:?} -> {after:?}");
    assert_eq!(cluster.sherlock_metric(port, "dstack_sherlock_reloads_total").await, reloads_before);
    let runtime_applies = cluster.sherlock_metric(port, "dstack_sherlock_runtime_applies_total").await;
    assert!(runtime_applies >= runtime_before + 4, "four changes went through the runtime api: {runtime_applies}");
    let (counts, _) = cluster.tally("/barker/", 100).await;
    let v2 = *by_version(&counts).get("v2").unwrap_or(&0);
    assert!((18..=22).contains(&v2), "the new weights are in force at run time: {counts:?}");
    let sherlock_log = cluster.sherlock.as_ref().unwrap().log_text();
    assert!(sherlock_log.contains("applied through the runtime api"), "{sherlock_log}");
}

/// Clients that open a new TCP connection for every request (as curl
/// does), so that each request meets whichever worker accepts at that
/// moment: a reload that dropped or refused connections would show here.
/// Records each request's start and end.
struct FreshConnections {
    /// (started, ended, ok) of every request.
    done: Arc<Mutex<Vec<(Instant, Instant, bool)>>>,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FreshConnections {
    fn start(port: u16, path: &'static str, clients: usize) -> FreshConnections {
        let done = Arc::new(Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let tasks = (0..clients)
            .map(|_| {
                let (done, stop) = (done.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let started = Instant::now();
                        let answer = tokio::time::timeout(Duration::from_secs(10), one_request(port, path)).await;
                        let ok = matches!(&answer, Ok(Ok(head)) if head.starts_with("HTTP/1.1 200"));
                        if !ok {
                            eprintln!("failed request: {answer:?}");
                        }
                        done.lock().unwrap().push((started, Instant::now(), ok));
                    }
                })
            })
            .collect();
        FreshConnections { done, stop, tasks }
    }

    /// Requests so far, succeeded and failed.
    fn counts(&self) -> (usize, usize) {
        let done = self.done.lock().unwrap();
        let ok = done.iter().filter(|r| r.2).count();
        (ok, done.len() - ok)
    }

    async fn finish(self) -> Vec<(Instant, Instant, bool)> {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        std::mem::take(&mut *self.done.lock().unwrap())
    }
}

/// One request on a connection of its own; the response's status line.
async fn one_request(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr(port)).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    Ok(text.lines().next().unwrap_or("").to_string())
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
    let run_dir = cluster.run_dir(cluster.sherlock_port);
    let before = show_proc(&run_dir).await;

    let load = FreshConnections::start(cluster.sherlock_port, "/barker/", 8);
    eventually(Duration::from_secs(10), "the load to get going", async || (load.counts().0 >= 100).then_some(())).await;
    // From here until HAProxy's master shows the new worker, a reload is
    // in progress or about to be.
    let triggered = Instant::now();
    let fresh = Instance::start("fresh").await;
    let _wf = cluster.watson("newsvc", &fresh.url(""), &[]);
    let after = eventually(Duration::from_secs(15), "haproxy's master to report the reload", async || {
        let state = show_proc(&run_dir).await;
        (state.reloads > before.reloads).then_some(state)
    })
    .await;
    let reloaded = Instant::now();
    // And as much load again after it, on the new worker.
    let (ok_at_reload, _) = load.counts();
    eventually(Duration::from_secs(10), "load after the reload", async || {
        (load.counts().0 >= ok_at_reload + 100).then_some(())
    })
    .await;
    let requests = load.finish().await;

    let failed = requests.iter().filter(|r| !r.2).count();
    let overlapping = requests.iter().filter(|(start, end, _)| *start <= reloaded && *end >= triggered).count();
    eprintln!(
        "{} requests, {overlapping} overlapping the {:?} from trigger to reload",
        requests.len(),
        reloaded - triggered
    );
    assert_eq!(failed, 0, "failed requests across the reload ({} in all)", requests.len());
    assert!(overlapping >= 100, "only {overlapping} requests overlapped the reload window");
    assert!(requests.len() >= 300, "the load ran: {}", requests.len());
    assert_eq!(after.reloads, before.reloads + 1, "a new service is one reload: {before:?} -> {after:?}");
    assert_eq!(after.failed, before.failed);
    assert_ne!(after.workers, before.workers, "a new worker took over");
    cluster.wait_for_instances("newsvc", 1).await;
    assert_eq!(cluster.get("/newsvc/x").await.unwrap(), (200, "fresh /x".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_mode_reload_reloads_for_every_change() {
    let cluster = Cluster::start().await;
    let (port, _reloader) = cluster.start_sherlock(&["--apply-mode", "reload"]).await;
    let (_instances, _watsons) = cluster.fleet("emitter", &["v1"]).await;
    cluster.wait_for_instances("emitter", 1).await;
    cluster.wait_until_warm().await;
    let runtime_dir = cluster.run_dir(cluster.sherlock_port);
    let reload_dir = cluster.run_dir(port);
    let runtime_before = show_proc(&runtime_dir).await;
    let mut last = show_proc(&reload_dir).await;

    // An instance added, then one removed: server changes only.
    let added = Instance::start("v1-9").await;
    let mut added_watson = cluster.watson("emitter", &added.url("/emitter"), &[]);
    cluster.wait_for_instances("emitter", 2).await;
    let after_add = show_proc(&reload_dir).await;
    assert!(after_add.reloads > last.reloads, "an added instance reloads: {last:?} -> {after_add:?}");
    assert_ne!(after_add.workers, last.workers, "a new worker took over");
    last = after_add;
    added_watson.stop();
    cluster.wait_for_instances("emitter", 1).await;
    let after_remove = show_proc(&reload_dir).await;
    assert!(after_remove.reloads > last.reloads, "a removed instance reloads: {last:?} -> {after_remove:?}");
    assert_eq!(get_via(&cluster.http, port, "/emitter/").await.unwrap(), (200, "v1-0 /emitter/".to_string()));

    assert_eq!(cluster.sherlock_metric(port, "dstack_sherlock_runtime_applies_total").await, 0);
    assert!(cluster.sherlock_metric(port, "dstack_sherlock_reloads_total").await >= 2);
    // The same changes cost the runtime-mode sherlock no reload at all.
    assert_eq!(show_proc(&runtime_dir).await, runtime_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_server_is_deleted_once_its_connections_end() {
    let cluster = Cluster::start().await;
    let (instances, mut watsons) = cluster.fleet("barker", &["v1", "v1"]).await;
    cluster.wait_for_instances("barker", 2).await;
    cluster.wait_until_warm().await;
    let port = cluster.sherlock_port;
    let run_dir = cluster.run_dir(port);

    // A request that stays open on one of the two servers.
    let http = cluster.http.clone();
    let held = tokio::spawn(async move { get_via(&http, port, "/barker/hold").await });
    let busy = eventually(Duration::from_secs(10), "the held request to arrive", async || {
        instances.iter().position(|i| i.seen.lock().unwrap().iter().any(|p| p.ends_with("/hold")))
    })
    .await;
    let url = instances[busy].url("/barker");
    let status = cluster.status().await;
    let id = status["instances"].as_array().unwrap().iter().find(|i| i["url"] == url.as_str()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(haproxy_servers(&run_dir, "svc_barker").contains(&id));

    // Its watson stops: deregistered, so sherlock drains it.
    watsons[busy].stop();
    cluster.wait_for_instances("barker", 1).await;
    eventually(Duration::from_secs(10), "sherlock to report the server draining", async || {
        (cluster.sherlock_status(port).await["draining"] == 1).then_some(())
    })
    .await;
    // While its connection is open it stays, across several reaps (every 500 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(haproxy_servers(&run_dir, "svc_barker").contains(&id), "deleted with a connection still open");
    let (counts, errors) = cluster.tally("/barker/", 10).await;
    assert_eq!((counts.len(), errors), (1, 0), "a draining server takes no new request: {counts:?}");

    // The connection ends (its answer arrives whole); then the server goes.
    instances[busy].release();
    let (code, body) = held.await.unwrap().unwrap();
    assert_eq!((code, body.starts_with(&instances[busy].name)), (200, true), "{body}");
    eventually(Duration::from_secs(15), "the drained server to be deleted", async || {
        (!haproxy_servers(&run_dir, "svc_barker").contains(&id)).then_some(())
    })
    .await;
    assert_eq!(haproxy_servers(&run_dir, "svc_barker").len(), 1);
    assert!(cluster.sherlock.as_ref().unwrap().log_text().contains("drained server deleted"));
    // Sherlock's status says so at once, not at the next apply.
    eventually(Duration::from_secs(5), "sherlock to report nothing draining", async || {
        (cluster.sherlock_status(port).await["draining"] == 0).then_some(())
    })
    .await;
}
