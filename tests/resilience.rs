//! Failure and restart: fail static when the directory is away, a restarted
//! directory that must not wipe routes while warming, an unreachable routes
//! remote, and runtime drift corrected and counted.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_directory_down_sherlock_keeps_serving_and_restarts_from_disk() {
    let mut cluster = Cluster::start().await;
    let _fleet = cluster.fleet("emitter", &["v1", "v1"]).await;
    cluster.wait_for_instances("emitter", 2).await;

    cluster.directory.kill();
    let (counts, errors) = cluster.tally("/emitter/", 20).await;
    assert_eq!((counts.len(), errors), (2, 0), "fail static: the last config stays: {counts:?}");

    // A sherlock restarted while the directory is still down serves at once
    // from the snapshot it saved.
    let port = cluster.sherlock_port;
    cluster.sherlock.take().unwrap().stop();
    let (_, restarted) = cluster.start_sherlock_at(port, &[]).await;
    cluster.sherlock = Some(restarted);
    let (counts, errors) = cluster.tally("/emitter/", 20).await;
    assert_eq!((counts.len(), errors), (2, 0), "served from the saved snapshot: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_directory_does_not_wipe_routes_while_it_warms() {
    let mut cluster = Cluster::start().await;
    // A 1 s period: the watsons re-register within a second or so.
    let _fleet = cluster.fleet("emitter", &["v1", "v1"]).await;
    cluster.wait_for_instances("emitter", 2).await;

    cluster.restart_directory().await;
    // Right after the restart the registry is empty, yet no request fails:
    // the warming snapshot adds but never removes.
    let status = cluster.status().await;
    assert_eq!(status["warming"], true, "{status}");
    let (counts, errors) = cluster.tally("/emitter/", 20).await;
    assert_eq!((counts.len(), errors), (2, 0), "{counts:?}");
    cluster.wait_for_instances("emitter", 2).await;
    cluster.wait_until_warm().await;
    let (counts, errors) = cluster.tally("/emitter/", 20).await;
    assert_eq!((counts.len(), errors), (2, 0), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_routes_remote_is_reported_and_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let remote = tmp.path().join("not-yet.git");
    let url = format!("file://{}", remote.display());
    let cluster = Cluster::start_with(&["--repo", &url, "--poll", "200ms"]).await;
    let error = eventually(Duration::from_secs(10), "the fetch error in the status", async || {
        cluster.status().await["routes"]["error"].as_str().map(str::to_string)
    })
    .await;
    assert!(error.contains("fetching"), "{error}");
    assert!(cluster.status().await["commit"].is_null());

    // The remote appears: the retry (with backoff, capped by the poll) finds it.
    std::fs::create_dir_all(&remote).unwrap();
    let mut opts = git2::RepositoryInitOptions::new();
    opts.bare(true).initial_head("main");
    git2::Repository::init_opts(&remote, &opts).unwrap();
    let work = RoutesRepo::new(tmp.path());
    work.repo.remote_set_url("origin", remote.to_str().unwrap()).unwrap();
    let commit = work.commit(&[("routes/barker.yaml", "barker: {v1: 100}\n")], "first");
    eventually(Duration::from_secs(15), "the commit once the remote exists", async || {
        let status = cluster.status().await;
        (status["commit"] == commit.to_string().as_str() && status["routes"]["error"].is_null()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_drift_is_corrected_and_counted() {
    let cluster = Cluster::start().await;
    let _fleet = cluster.fleet("emitter", &["v1", "v1"]).await;
    cluster.wait_for_instances("emitter", 2).await;
    let run_dir = cluster.dir.path().join(format!("sherlock-{}", cluster.sherlock_port));
    let admin = cluster.admin_port(cluster.sherlock_port);

    // An operator (or a lost command) puts a server in maintenance behind
    // sherlock's back.
    let state =
        dstack::sherlock::haproxy::socket_command(&run_dir.join("admin.sock"), "show servers state svc_emitter")
            .await
            .unwrap();
    let server =
        state.lines().filter(|l| !l.starts_with('#')).find_map(|l| l.split_whitespace().nth(3)).unwrap().to_string();
    let answer = dstack::sherlock::haproxy::socket_command(
        &run_dir.join("admin.sock"),
        &format!("set server svc_emitter/{server} state maint"),
    )
    .await
    .unwrap();
    assert!(answer.trim().is_empty(), "{answer}");

    let metrics_url = format!("http://127.0.0.1:{admin}/metrics");
    let corrected = eventually(Duration::from_secs(15), "the drift to be corrected", async || {
        let text = cluster.http.get(&metrics_url).send().await.ok()?.text().await.ok()?;
        let line = text.lines().find(|l| l.starts_with("dstack_sherlock_drift_corrections_total "))?;
        let n: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        (n >= 1).then_some(n)
    })
    .await;
    assert!(corrected >= 1);
    let (counts, errors) = cluster.tally("/emitter/", 10).await;
    assert_eq!((counts.len(), errors), (2, 0), "both servers take traffic again: {counts:?}");

    let status: serde_json::Value =
        cluster.http.get(format!("http://127.0.0.1:{admin}/status")).send().await.unwrap().json().await.unwrap();
    assert_eq!(status["haproxy_running"], true, "{status}");
    assert_eq!(status["services"], 1, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sherlock_fails_over_to_the_next_directory() {
    // Two directories; every watson heartbeats to both; sherlock follows both.
    let mut cluster = Cluster::start().await;
    let second_port = free_port();
    let listen = format!("127.0.0.1:{second_port}");
    let state = cluster.dir.path().join("second-directory").to_str().unwrap().to_string();
    let _second =
        Proc::start(cluster.dir.path(), "directory", &["--listen", &listen, "--max-ttl", "3s", "--state-dir", &state]);
    let first = cluster.directory_url();
    let second = format!("http://127.0.0.1:{second_port}");
    let port = free_port();
    let (port, _sherlock) = cluster.start_sherlock_at(port, &["-d", &second]).await;
    let watson = |instance: &Instance| {
        Proc::start(
            cluster.dir.path(),
            "watson",
            &["-d", &first, "-d", &second, "emitter", &instance.url("/emitter"), "1"],
        )
    };
    let a = Instance::start("vm101").await;
    let _wa = watson(&a);
    cluster.wait_for_instances("emitter", 1).await;

    cluster.directory.kill();
    let b = Instance::start("vm102").await;
    let _wb = watson(&b);
    let http = cluster.http.clone();
    eventually(Duration::from_secs(20), "vm102 through the second directory", async || {
        let (_, body) = get_via(&http, port, "/emitter/").await.ok()?;
        let (_, body2) = get_via(&http, port, "/emitter/").await.ok()?;
        (body.starts_with("vm102") || body2.starts_with("vm102")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_fails_haproxys_check_is_never_applied() {
    let cluster = Cluster::start().await;
    // A user template that breaks as soon as there is a service.
    let builtin = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/haproxy.cfg.j2")).unwrap();
    let broken = builtin
        .replace("frontend dstack\n", "frontend dstack\n{% if services %}    no-such-directive here\n{% endif %}");
    assert_ne!(broken, builtin);
    let template = cluster.dir.path().join("broken.cfg.j2");
    std::fs::write(&template, broken).unwrap();
    let (port, sherlock) = cluster.start_sherlock(&["--template", template.to_str().unwrap()]).await;
    let admin = cluster.admin_port(port);

    let a = Instance::start("vm101").await;
    let _wa = cluster.watson("emitter", &a.url("/emitter"), &[]);
    let url = format!("http://127.0.0.1:{admin}/status");
    let error = eventually(Duration::from_secs(15), "the rejected candidate in /status", async || {
        let status: serde_json::Value = cluster.http.get(&url).send().await.ok()?.json().await.ok()?;
        status["last_error"].as_str().map(str::to_string)
    })
    .await;
    assert!(error.contains("no-such-directive"), "{error}");
    // The running config stays: HAProxy still answers, without the service.
    let (status, _) = get_via(&cluster.http, port, "/emitter/").await.unwrap();
    assert_eq!(status, 404);
    let running = std::fs::read_to_string(cluster.dir.path().join(format!("sherlock-{port}/haproxy.cfg"))).unwrap();
    assert!(!running.contains("no-such-directive"));
    assert!(sherlock.log_text().contains("snapshot not applied"));
    // The default sherlock, on the built-in template, serves it.
    eventually(Duration::from_secs(10), "the default sherlock to serve emitter", async || {
        let (status, body) = cluster.get("/emitter/").await.ok()?;
        (status == 200 && body.starts_with("vm101")).then_some(())
    })
    .await;
}
