//! The dstack walkthrough, end to end: real directory, watsons, sherlock and
//! HAProxy, with real HTTP instances on loopback.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_path_rewrite_and_route_list() {
    let cluster = Cluster::start().await;
    let instances = [Instance::start("vm101").await, Instance::start("vm102").await, Instance::start("vm103").await];
    let _watsons: Vec<Proc> =
        instances.iter().map(|i| cluster.watson("//services/emitter", &i.url("/emitter"), &[])).collect();
    let root = Instance::start("rooted").await;
    let _root_watson = cluster.watson("rooted", &root.url(""), &[]);
    cluster.wait_for_instances("emitter", 3).await;
    cluster.wait_for_instances("rooted", 1).await;

    let (counts, errors) = cluster.tally("/emitter/", 30).await;
    assert_eq!(errors, 0);
    for i in &instances {
        assert_eq!(counts.get(&i.name), Some(&10), "round robin over three gives ten each: {counts:?}");
    }

    // `/emitter` is replaced by the instance's path; the query passes through.
    let (status, body) = cluster.get("/emitter/rest/deeper?x=1&y=two").await.unwrap();
    assert_eq!(status, 200);
    assert!(body.ends_with(" /emitter/rest/deeper?x=1&y=two"), "{body}");
    let (_, body) = cluster.get("/emitter").await.unwrap();
    assert!(body.ends_with(" /emitter"), "{body}");
    // A root-path instance sees the rest of the path alone.
    let (_, body) = cluster.get("/rooted/a/b?q").await.unwrap();
    assert_eq!(body, "rooted /a/b?q");
    let (_, body) = cluster.get("/rooted").await.unwrap();
    assert_eq!(body, "rooted /");
    // Prefixes match whole segments only, and unknown services get a 404.
    let (status, body) = cluster.get("/emitterx/").await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no service"), "{body}");

    let (code, out, err) = cluster.dw(&["route", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("SERVICE"), "{out}");
    for i in &instances {
        let line = out.lines().find(|l| l.contains(&i.url("/emitter"))).unwrap_or_else(|| panic!("{out}"));
        assert!(line.starts_with("emitter") && line.contains(" v1 ") && line.contains(" yes "), "{line}");
        assert!(line.contains("33.3%") && line.contains("s ago"), "{line}");
    }
    // The address forms of the README (Command lines) all reach the same
    // directory. A bare `host:port` means http, so a TLS directory is
    // reached by its https:// forms (the certificate names both hosts).
    let port = cluster.directory_port;
    let forms = if cluster.security.is_some() {
        [format!("https://127.0.0.1:{port}/"), format!("https://localhost:{port}")]
    } else {
        [format!("127.0.0.1:{port}"), format!("http://127.0.0.1:{port}/")]
    };
    let flags = cluster.operator_flags();
    for form in forms {
        let mut args = vec!["-d", form.as_str()];
        args.extend(flags.iter().map(String::as_str));
        args.extend(["route", "list"]);
        let (code, out, err) = run_dw(&args, None);
        assert_eq!(code, 0, "{form}: {err}");
        assert!(out.contains("rooted"), "{out}");
    }
}

/// Sends requests in a loop until stopped; counts failures.
fn load(port: u16, path: &'static str) -> (Arc<AtomicUsize>, Arc<AtomicUsize>, tokio::sync::oneshot::Sender<()>) {
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let (ok2, failed2) = (ok.clone(), failed.clone());
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        loop {
            if stopped.try_recv().is_ok() {
                return;
            }
            match get_via(&http, port, path).await {
                Ok((200, _)) => ok2.fetch_add(1, Ordering::SeqCst),
                other => {
                    eprintln!("failed request: {other:?}");
                    failed2.fetch_add(1, Ordering::SeqCst)
                }
            };
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    (ok, failed, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_leaves_without_client_errors_and_returns() {
    let cluster = Cluster::start().await;
    let mut instances =
        [Instance::start("vm101").await, Instance::start("vm102").await, Instance::start("vm103").await];
    let _watsons: Vec<Proc> = instances.iter().map(|i| cluster.watson("emitter", &i.url("/emitter"), &[])).collect();
    cluster.wait_for_instances("emitter", 3).await;
    cluster.wait_until_warm().await;

    let (ok, failed, stop) = load(cluster.sherlock_port, "/emitter/");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_port = instances[1].port;
    instances[1].kill().await;
    let killed_at = Instant::now();
    cluster.wait_for_instances("emitter", 2).await;
    let out_after = killed_at.elapsed();
    // period 1 s x fall 2 + 1 s.
    assert!(out_after <= Duration::from_secs(3), "out of rotation after {out_after:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Back on the same port: it returns to rotation.
    instances[1] = Instance::start_on("vm102", killed_port).await;
    cluster.wait_for_instances("emitter", 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).ok();
    assert_eq!(failed.load(Ordering::SeqCst), 0, "clients saw errors ({} ok)", ok.load(Ordering::SeqCst));
    assert!(ok.load(Ordering::SeqCst) > 100);
    let (counts, _) = cluster.tally("/emitter/", 9).await;
    assert_eq!(counts.get("vm102"), Some(&3), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_liveness_check_takes_an_instance_out_and_a_passing_one_brings_it_back() {
    let cluster = Cluster::start().await;
    let a = Instance::start("vm101").await;
    let b = Instance::start("vm102").await;
    let _wa = cluster.watson("emitter", &a.url("/emitter"), &["--rise", "2", "--fall", "2"]);
    let _wb = cluster.watson("emitter", &b.url("/emitter"), &[]);
    cluster.wait_for_instances("emitter", 2).await;
    cluster.wait_until_warm().await;

    b.healthy.store(false, Ordering::SeqCst);
    cluster.wait_for_instances("emitter", 1).await;
    let (counts, errors) = cluster.tally("/emitter/", 10).await;
    assert_eq!((counts.get("vm101"), errors), (Some(&10), 0), "{counts:?}");

    b.healthy.store(true, Ordering::SeqCst);
    cluster.wait_for_instances("emitter", 2).await;
    let (counts, _) = cluster.tally("/emitter/", 10).await;
    assert_eq!(counts.get("vm102"), Some(&5), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transform_consumes_emitter_through_sherlock_as_a_pipeline() {
    let cluster = Cluster::start().await;
    let emitter = Instance::start("vm101").await;
    let _we = cluster.watson("emitter", &emitter.url("/emitter"), &[]);

    // transform: answers by fetching emitter through the local sherlock.
    let upstream = format!("http://127.0.0.1:{}/emitter/from-transform", cluster.sherlock_port);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let transform_port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let upstream = upstream.clone();
        async move {
            if req.uri().path().ends_with("/liveness_check") {
                return "alive".to_string();
            }
            let body = reqwest::get(&upstream).await.unwrap().text().await.unwrap();
            format!("transformed {}", body.to_uppercase())
        }
    });
    let server = tokio::spawn(async move { axum::serve(listener, app).await.ok() });

    // watson from a config file and a services dir, the other form.
    let services = cluster.dir.path().join("datawire.d");
    std::fs::create_dir(&services).unwrap();
    std::fs::write(
        services.join("transform.yaml"),
        format!("name: transform\nurl: http://127.0.0.1:{transform_port}/transform\nperiod: 1\n"),
    )
    .unwrap();
    let config = cluster.dir.path().join("watson.yaml");
    let secure = cluster.client_config(&cluster.watson_token());
    std::fs::write(
        &config,
        format!("directories:\n  - {}\nservices_dir: {}\n{secure}", cluster.directory_url(), services.display()),
    )
    .unwrap();
    let _wt = Proc::start(cluster.dir.path(), "watson", &["-c", config.to_str().unwrap()]);

    cluster.wait_for_instances("transform", 1).await;
    cluster.wait_for_instances("emitter", 1).await;
    let (status, body) = cluster.get("/transform/").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "transformed VM101 /EMITTER/FROM-TRANSFORM");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_deregister_at_once() {
    let cluster = Cluster::start().await;
    let a = Instance::start("vm101").await;
    let b = Instance::start("vm102").await;
    let mut by_term = cluster.watson("emitter", &a.url("/emitter"), &[]);
    let mut by_int = cluster.watson("emitter", &b.url("/emitter"), &[]);
    cluster.wait_for_instances("emitter", 2).await;
    for (watson, signal, left) in [(&mut by_term, libc::SIGTERM, 1), (&mut by_int, libc::SIGINT, 0)] {
        let t0 = Instant::now();
        let status = watson.stop_with(signal);
        assert!(status.success(), "watson exited with {status} on signal {signal}");
        cluster.wait_for_instances("emitter", left).await;
        // The TTL is 3 s: gone well before it means deregistered, not expired.
        assert!(t0.elapsed() < Duration::from_millis(1500), "signal {signal}: took {:?}", t0.elapsed());
        assert!(watson.log_text().contains("deregistered at shutdown"), "signal {signal}");
    }
    assert!(by_int.log_text().contains("SIGINT"), "{}", by_int.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_url_elsewhere_decides_liveness() {
    let cluster = Cluster::start().await;
    let a = Instance::start("vm101").await;
    // The instance's own /liveness_check always passes; this one decides.
    let health = Instance::start("health").await;
    let check = health.url("/status/liveness_check");
    let _watson = cluster.watson("emitter", &a.url("/emitter"), &["--check-url", &check, "--rise", "1", "--fall", "1"]);
    cluster.wait_for_instances("emitter", 1).await;

    health.healthy.store(false, Ordering::SeqCst);
    cluster.wait_for_instances("emitter", 0).await;
    assert!(a.healthy.load(Ordering::SeqCst), "its own check would still pass");
    health.healthy.store(true, Ordering::SeqCst);
    cluster.wait_for_instances("emitter", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_are_refused_at_the_api_and_the_cli() {
    let cluster = Cluster::start().await;
    // As a watson may (with its token in secure mode), so the refusals are the body's.
    let http = cluster.http_as(&cluster.watson_token());
    let put = |id: &str, body: &str| {
        http.put(format!("{}/v1/instances/{id}", cluster.directory_url())).body(body.to_string()).send()
    };
    let cases = [
        ("e1", r#"{"service":"Emitter;","version":"v1","url":"http://h","ttl_ms":3000}"#, "invalid service name"),
        ("e1", r#"{"service":"e","version":"v1","url":"http://h/x\ny","ttl_ms":3000}"#, "invalid instance URL"),
        ("e1", r#"{"service":"e","version":"v1}"#, "invalid heartbeat body"),
        ("e%20x", r#"{"service":"e","version":"v1","url":"http://h","ttl_ms":3000}"#, "invalid instance id"),
    ];
    for (id, body, want) in cases {
        let resp = put(id, body).await.unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let json: serde_json::Value = resp.json().await.unwrap();
        assert!(json["error"].as_str().unwrap().contains(want), "{json}");
    }
    assert_eq!(put("e1", &"x".repeat(1 << 20)).await.unwrap().status(), 413);
    assert_eq!(cluster.status().await["instances"].as_array().unwrap().len(), 0);

    let directory = cluster.directory_url();
    let cli_cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("watson", vec!["-d", &directory, "Bad_Name", "http://127.0.0.1:1", "1"], "invalid service name"),
        ("watson", vec!["-d", &directory, "emitter", "ftp://x", "1"], "invalid instance URL"),
        ("watson", vec!["-d", &directory, "emitter", "http://x", "1", "--version", "v 2"], "invalid version"),
        ("watson", vec!["-d", "http://x/y", "emitter", "http://x", "1"], "invalid directory address"),
        ("sherlock", vec!["-d", "bad host"], "invalid directory address"),
        ("dw", vec!["-d", "//", "route", "list"], "invalid directory address"),
    ];
    for (name, args, want) in cli_cases {
        let out = std::process::Command::new(bin(name)).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name} {args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
        assert!(stderr.contains(want) && (stderr.contains("expected") || stderr.contains("characters")), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sherlocks_haproxy_serves_on_until_the_next_sherlock_takes_it_over() {
    let mut cluster = Cluster::start().await;
    let run_dir = cluster.run_dir(cluster.sherlock_port);
    assert!(!haproxy_pids(&run_dir).is_empty(), "haproxy runs under sherlock");
    let status = cluster.sherlock.as_mut().unwrap().stop();
    assert!(status.success(), "sherlock exited with {status}");
    assert_eq!(haproxy_pids(&run_dir), Vec::<i32>::new(), "SIGTERM: no orphan haproxy");

    let a = Instance::start("vm101").await;
    let _wa = cluster.watson("emitter", &a.url("/emitter"), &[]);
    let (port, mut first) = cluster.start_sherlock(&[]).await;
    // Not wait_for_instances: the directory still counts the stopped
    // sherlock, which will never apply anything again.
    eventually(Duration::from_secs(15), "the instance served through the new sherlock", async || {
        matches!(get_via(&cluster.http, port, "/emitter/").await, Ok((200, _))).then_some(())
    })
    .await;
    let run_dir = cluster.run_dir(port);
    // The next sherlock serves what this one saved: wait for the save,
    // which comes right after HAProxy has the change.
    eventually(Duration::from_secs(15), "the applied snapshot saved", async || {
        std::fs::read_to_string(run_dir.join("snapshot.json")).ok().filter(|s| s.contains("emitter")).map(|_| ())
    })
    .await;
    // A reload's old worker may still be leaving: compare masters.
    let old = haproxy_pids(&run_dir);
    let proc = try_socket_command(&run_dir.join("master.sock"), "show proc").unwrap();
    let old_master = parse_show_proc(&proc).expect("an HAProxy master").master as i32;

    // Clients call back to back, each on a new connection, through the
    // kill and the takeover; every failure is kept.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, http) = (stop.clone(), reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap());
        tokio::spawn(async move {
            let (mut sent, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                sent += 1;
                match get_via(&http, port, "/emitter/").await {
                    Ok((200, _)) => {}
                    other => failed.push(format!("{other:?}")),
                }
            }
            (sent, failed)
        })
    };

    // SIGKILL, which sherlock cannot catch: its HAProxy serves on.
    first.signal(libc::SIGKILL);
    first.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(haproxy_pids(&run_dir).contains(&old_master), "HAProxy outlives a killed sherlock");

    // The next sherlock on the same run dir starts its own HAProxy on the
    // socket the old one serves, then lets the old one go.
    let (_, _second) = cluster.start_sherlock_at(port, &[]).await;
    let new = eventually(Duration::from_secs(20), "the old haproxy to leave", async || {
        let now = haproxy_pids(&run_dir);
        (!now.is_empty() && now.iter().all(|p| !old.contains(p))).then_some(now)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (sent, failed) = load.await.unwrap();
    assert!(sent > 50, "only {sent} requests sent");
    assert_eq!(failed, Vec::<String>::new(), "of {sent} requests through a kill and a takeover");
    assert_eq!(cluster.sherlock_status(port).await["haproxy_running"], true);
    println!("{sent} requests, none failed; haproxy {old:?} -> {new:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sherlock_reads_its_config_file_when_given_no_directory() {
    let cluster = Cluster::start().await;
    let a = Instance::start("vm101").await;
    let _wa = cluster.watson("emitter", &a.url("/emitter"), &[]);
    let port = free_port();
    let config = cluster.dir.path().join("sherlock.yaml");
    let run_dir = cluster.dir.path().join("from-file");
    let secure = cluster.client_config(&cluster.sherlock_token("from-file").await);
    std::fs::write(
        &config,
        format!(
            "directories:\n  - {}\nlisten: 127.0.0.1:{port}\nrun_dir: {}\nadmin: 127.0.0.1:{}\nclient: monolith\n{secure}",
            cluster.directory_url(),
            run_dir.display(),
            free_port()
        ),
    )
    .unwrap();
    let _sherlock = Proc::start(cluster.dir.path(), "sherlock", &["-c", config.to_str().unwrap()]);
    let http = cluster.http.clone();
    let body = eventually(Duration::from_secs(15), "the file-configured sherlock to route", async || {
        get_via(&http, port, "/emitter/x").await.ok().filter(|(s, _)| *s == 200).map(|(_, b)| b)
    })
    .await;
    assert_eq!(body, "vm101 /emitter/x");
    assert!(run_dir.join("haproxy.cfg").exists(), "run_dir comes from the file");

    // A bad file is one clear line and exit 2.
    std::fs::write(&config, "directories: [//services/directory]\nlisten: nowhere\n").unwrap();
    let out = std::process::Command::new(bin("sherlock")).args(["-c", config.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("sherlock.yaml:2:"), "{stderr}");
}
