//! Failure and restart: fail static when the directory is away, a restarted
//! directory that must not wipe routes while warming, an unreachable routes
//! remote (before and after a commit was served), a reload HAProxy refuses,
//! and runtime drift corrected and counted.

mod common;

use std::time::Duration;

use common::*;

/// How many times sherlock has logged losing its directory.
fn unreachable_logged(sherlock: &Proc) -> usize {
    sherlock.log_text().matches("directory unreachable").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_directory_down_sherlock_keeps_serving_and_restarts_from_disk() {
    let mut cluster = Cluster::start().await;
    let _fleet = cluster.fleet("emitter", &["v1", "v1"]).await;
    cluster.wait_for_instances("emitter", 2).await;
    let before = unreachable_logged(cluster.sherlock.as_ref().unwrap());

    cluster.directory.kill();
    // Only once sherlock has seen the directory gone does traffic say
    // anything about fail static.
    eventually(Duration::from_secs(10), "sherlock to see the directory gone", async || {
        (unreachable_logged(cluster.sherlock.as_ref().unwrap()) > before).then_some(())
    })
    .await;
    let (counts, errors) = cluster.tally("/emitter/", 20).await;
    assert_eq!((counts.len(), errors), (2, 0), "fail static: the last config stays: {counts:?}");
    let status = cluster.sherlock_status(cluster.sherlock_port).await;
    assert_eq!((status["servers"].as_u64(), status["haproxy_running"].as_bool()), (Some(2), Some(true)), "{status}");

    // A sherlock restarted while the directory is still down serves at once
    // from the snapshot it saved.
    let port = cluster.sherlock_port;
    cluster.sherlock.take().unwrap().stop();
    let (_, restarted) = cluster.start_sherlock_at(port, &[]).await;
    eventually(Duration::from_secs(10), "the restarted sherlock to find no directory", async || {
        (unreachable_logged(&restarted) > 0).then_some(())
    })
    .await;
    cluster.sherlock = Some(restarted);
    let (counts, errors) = cluster.tally("/emitter/", 20).await;
    assert_eq!((counts.len(), errors), (2, 0), "served from the saved snapshot: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_directory_does_not_wipe_routes_while_it_warms() {
    let mut cluster = Cluster::start().await;
    let (_instances, mut watsons) = cluster.fleet("emitter", &["v1", "v1"]).await;
    cluster.wait_for_instances("emitter", 2).await;
    let port = cluster.sherlock_port;
    // (epoch, index) once sherlock reports an epoch; the index alone before.
    let applied = |status: &serde_json::Value| (status.get("applied_epoch").cloned(), status["applied_index"].as_u64());
    let applied_before = applied(&cluster.sherlock_status(port).await);

    // The watsons die without deregistering, so nothing will ever refill
    // the restarted directory's registry: only warming can keep the routes.
    for watson in &mut watsons {
        watson.kill();
    }
    cluster.restart_directory().await;
    let http = cluster.http.clone();
    let snapshot_url = format!("{}/v1/snapshot", cluster.directory_url());
    let warming = eventually(Duration::from_secs(10), "sherlock to apply the warming snapshot", async || {
        let snapshot: serde_json::Value = http.get(&snapshot_url).send().await.ok()?.json().await.ok()?;
        let now = applied(&cluster.sherlock_status(port).await);
        let served = (now.0.as_ref().and(snapshot.get("epoch").cloned()), snapshot["index"].as_u64());
        (now != applied_before && now == served).then_some(snapshot)
    })
    .await;
    assert_eq!(warming["warming"], true, "the snapshot sherlock applied: {warming}");
    assert_eq!(warming["services"].as_object().map(|s| s.len()), Some(0), "an empty registry: {warming}");
    let gauge = cluster.sherlock_metric(port, "dstack_sherlock_applied_index").await;
    assert_eq!(Some(gauge), warming["index"].as_u64(), "/metrics agrees with /status");
    let status = cluster.sherlock_status(port).await;
    assert_eq!(status["servers"], 2, "the warming snapshot removed nothing: {status}");
    let (counts, errors) = cluster.tally("/emitter/", 20).await;
    assert_eq!((counts.len(), errors), (2, 0), "{counts:?}");

    // Warming ends and the empty registry is in force: that the backends go
    // now shows it was warming that kept them.
    cluster.wait_until_warm().await;
    eventually(Duration::from_secs(10), "sherlock to remove the backends once warm", async || {
        (cluster.sherlock_status(port).await["servers"] == 0).then_some(())
    })
    .await;
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
async fn a_remote_lost_after_a_commit_was_served_keeps_that_commit_and_traffic() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let served = repo.commit(&[("routes/barker.yaml", "barker: {v1: 0, v2: 100}\n")], "all on v2");
    let url = repo.url();
    let cluster = Cluster::start_with(&["--repo", &url, "--poll", "200ms"]).await;
    let (_instances, _watsons) = cluster.fleet("barker", &["v1", "v2"]).await;
    cluster.wait_for_instances("barker", 2).await;
    cluster.wait_for_commit(served).await;
    let index = cluster.status().await["index"].clone();
    let (counts, errors) = cluster.tally("/barker/", 10).await;
    assert_eq!((by_version(&counts).get("v2"), errors), (Some(&10), 0), "{counts:?}");

    // The remote goes away (a moved repo, a host down): fetches fail.
    let moved = tmp.path().join("routes-remote.moved");
    std::fs::rename(&repo.remote, &moved).unwrap();
    let error = eventually(Duration::from_secs(10), "the fetch error in the status", async || {
        cluster.status().await["routes"]["error"].as_str().map(str::to_string)
    })
    .await;
    assert!(error.contains("fetching"), "{error}");
    let status = cluster.status().await;
    assert_eq!(status["commit"], served.to_string(), "the last good commit stays in force: {status}");
    assert_eq!(status["routes"]["commit"], served.to_string(), "{status}");
    assert_eq!(status["index"], index, "no new snapshot: {status}");
    let (counts, errors) = cluster.tally("/barker/", 10).await;
    assert_eq!((by_version(&counts).get("v2"), errors), (Some(&10), 0), "traffic unchanged: {counts:?}");

    // Back where it was: the retry finds it and the error clears.
    std::fs::rename(&moved, &repo.remote).unwrap();
    eventually(Duration::from_secs(15), "the error to clear once the remote is back", async || {
        let status = cluster.status().await;
        (status["routes"]["error"].is_null() && status["commit"] == served.to_string().as_str()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_fails_leaves_the_old_worker_serving() {
    let cluster = Cluster::start().await;
    // A port the test holds: `haproxy -c` does not bind, so a config that
    // also listens here passes the check, and only the reload itself fails.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let builtin = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/haproxy.cfg.j2")).unwrap();
    let template = cluster.dir.path().join("second-frontend.cfg.j2");
    std::fs::write(
        &template,
        format!(
            "{builtin}\n{{% if services|length > 1 %}}\nfrontend extra\n    bind 127.0.0.1:{busy_port}\n    \
             default_backend dstack_no_service\n{{% endif %}}\n"
        ),
    )
    .unwrap();
    let (port, sherlock) = cluster.start_sherlock(&["--template", template.to_str().unwrap()]).await;
    let run_dir = cluster.run_dir(port);

    // One service: a good reload.
    let a = Instance::start("vm101").await;
    let _wa = cluster.watson("emitter", &a.url("/emitter"), &[]);
    cluster.wait_for_instances("emitter", 1).await;
    let before = show_proc(&run_dir).await;
    assert_eq!(before.failed, 0, "{before:?}");
    assert_eq!(get_via(&cluster.http, port, "/emitter/").await.unwrap(), (200, "vm101 /emitter/".to_string()));

    // A second service renders the extra frontend: checked fine, then the
    // reload cannot bind and HAProxy's master reports it failed.
    let b = Instance::start("vm201").await;
    let _wb = cluster.watson("other", &b.url(""), &[]);
    let error = eventually(Duration::from_secs(15), "the failed reload in sherlock's /status", async || {
        cluster.sherlock_status(port).await["last_error"].as_str().map(str::to_string)
    })
    .await;
    assert!(error.contains("reload failed"), "{error}");
    assert!(cluster.sherlock_metric(port, "dstack_sherlock_failed_reloads_total").await >= 1);
    let after = show_proc(&run_dir).await;
    assert!(after.failed > before.failed, "haproxy's master counts the failed reload: {before:?} -> {after:?}");
    assert_eq!(after.workers, before.workers, "the old worker is still the one serving");
    assert!(sherlock.log_text().contains("cannot bind socket"), "haproxy's own reason is in sherlock's log");

    // It serves the old config: emitter, and no `other` yet.
    let (counts, errors) = cluster.tally_via(port, "/emitter/", 10).await;
    assert_eq!((counts.get("vm101"), errors), (Some(&10), 0), "{counts:?}");
    assert_eq!(get_via(&cluster.http, port, "/other/").await.unwrap().0, 404);
    let on_disk = std::fs::read_to_string(run_dir.join("haproxy.cfg")).unwrap();
    assert!(!on_disk.contains("frontend extra"), "haproxy.cfg is put back to what runs:\n{on_disk}");
    // The built-in template's sherlock serves both: the snapshot was fine.
    eventually(Duration::from_secs(10), "the default sherlock to serve other", async || {
        (cluster.get("/other/").await.ok()?.0 == 200).then_some(())
    })
    .await;
    drop(busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_drift_is_corrected_and_counted() {
    let cluster = Cluster::start().await;
    let _fleet = cluster.fleet("emitter", &["v1", "v1"]).await;
    cluster.wait_for_instances("emitter", 2).await;
    let run_dir = cluster.run_dir(cluster.sherlock_port);
    let admin = cluster.admin_port(cluster.sherlock_port);

    // An operator (or a lost command) puts a server in maintenance behind
    // sherlock's back.
    let server = haproxy_servers(&run_dir, "svc_emitter").remove(0);
    let answer = socket_command(&run_dir.join("admin.sock"), &format!("set server svc_emitter/{server} state maint"));
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
    let first = cluster.directory_url();
    // The second directory reads the shared auth file when it starts: the
    // sherlock's token goes in first (a no-op when plain). Until the second
    // answers, the sherlock follows the first.
    let port = free_port();
    cluster.sherlock_token(&Cluster::sherlock_name(port)).await;
    let (second, _second) = cluster.another_directory("second-directory");
    let (port, _sherlock) = cluster.start_sherlock_at(port, &["-d", &second]).await;
    let flags = cluster.watson_flags();
    let watson = |instance: &Instance| {
        let url = instance.url("/emitter");
        let mut args = vec!["-d", first.as_str(), "-d", second.as_str(), "emitter", url.as_str(), "1"];
        args.extend(flags.iter().map(String::as_str));
        Proc::start(cluster.dir.path(), "watson", &args)
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
