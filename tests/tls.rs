//! TLS and the serving limits, end to end with the real binaries and
//! certificates made at run time (rcgen): the walkthrough over mutual TLS,
//! every refusal a client can meet and what it says, https:// liveness
//! checks, certificate rotation on SIGHUP, slowloris and the connection
//! limit.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Starts a directory on a free loopback port with `args`; (port, process)
/// once it logs that it listens.
async fn directory(dir: &Path, args: &[String]) -> (u16, Proc) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut all = vec!["--listen", &listen];
    if !args.iter().any(|a| a == "--max-ttl") {
        all.extend(["--max-ttl", "3s"]);
    }
    all.extend(args.iter().map(String::as_str));
    let proc = Proc::start(dir, "directory", &all);
    proc.wait_for_log("directory listening", Duration::from_secs(10)).await;
    (port, proc)
}

/// A config file for the directory with a `limits:` section.
fn limits_file(dir: &Path, name: &str, yaml: &str) -> Vec<String> {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    vec!["-c".into(), path_arg(&path)]
}

/// `dw ARGS` with no user config (so only the flags count); (code, stdout,
/// stderr, how long it took).
fn dw(home: &Path, args: &[&str]) -> (i32, String, String, Duration) {
    let started = Instant::now();
    let out = Command::new(bin("dw"))
        .args(args)
        .env("NO_COLOR", "1")
        .env("XDG_CONFIG_HOME", home)
        .env_remove("DSTACK_TOKEN")
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr), started.elapsed())
}

async fn json(http: &reqwest::Client, url: &str) -> Value {
    let resp = http.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {}", dstack::client::explain(&e)));
    assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walkthrough_over_mutual_tls() {
    let tmp = tempfile::Builder::new().prefix("dstack-tls").tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "main");
    let mut args = pki.server_args();
    args.extend(["--client-ca".into(), path_arg(&pki.ca)]);
    let (port, _directory) = directory(tmp.path(), &args).await;
    let base = format!("https://127.0.0.1:{port}");

    // watson with flags.
    let instance = Instance::start("vm101").await;
    let mut watson_args = vec!["-d".to_string(), base.clone(), "emitter".into(), instance.url("/emitter"), "1".into()];
    watson_args.extend(pki.client_args(true));
    let _watson = Proc::start(tmp.path(), "watson", &watson_args.iter().map(String::as_str).collect::<Vec<_>>());

    // sherlock with its config file's keys.
    let sherlock_port = free_port();
    let config = tmp.path().join("sherlock.yaml");
    std::fs::write(
        &config,
        format!(
            "directories: [\"{base}\"]\nlisten: 127.0.0.1:{sherlock_port}\nrun_dir: {}\nadmin: \"off\"\nname: main\n\
             ca_file: {}\nclient_cert: {}\nclient_key: {}\n",
            tmp.path().join("sherlock").display(),
            pki.ca.display(),
            pki.client_cert.display(),
            pki.client_key.display()
        ),
    )
    .unwrap();
    let sherlock = Proc::start(tmp.path(), "sherlock", &["-c", config.to_str().unwrap()]);

    let https = pki.http(true);
    let status_url = format!("{base}/v1/status");
    eventually(Duration::from_secs(20), "emitter registered and applied by sherlock over TLS", async || {
        let status = https.get(&status_url).send().await.ok()?.json::<Value>().await.ok()?;
        let registered = status["instances"].as_array()?.iter().any(|i| i["service"] == "emitter");
        (registered && all_applied(&status)).then_some(())
    })
    .await;
    let plain = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let (code, body) = get_via(&plain, sherlock_port, "/emitter/hello").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "vm101 /emitter/hello"), "sherlock's log:\n{}", sherlock.log_text());

    let mut dw_args = vec!["-d", base.as_str(), "route", "list"];
    let client_args = pki.client_args(true);
    dw_args.extend(client_args.iter().map(String::as_str));
    let (code, out, err, _) = dw(tmp.path(), &dw_args);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("emitter") && out.contains(&instance.url("/emitter")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_says_what_is_wrong() {
    let tmp = tempfile::Builder::new().prefix("dstack-tls").tempdir().unwrap();
    let home = tmp.path().join("home");
    let pki = Pki::new(tmp.path(), "main");
    let other = Pki::new(tmp.path(), "other");
    let (tls_port, _tls) = directory(tmp.path(), &pki.server_args()).await;
    let mut mutual_args = pki.server_args();
    mutual_args.extend(["--client-ca".into(), path_arg(&pki.ca)]);
    let (mutual_port, _mutual) = directory(tmp.path(), &mutual_args).await;
    let (plain_port, _plain) = directory(tmp.path(), &[]).await;
    let ca = path_arg(&pki.ca);
    let run = |base: String, extra: &[&str]| {
        let mut args = vec!["-d", base.as_str(), "status"];
        args.extend_from_slice(extra);
        dw(&home, &args)
    };
    let (tls, mutual) = (format!("https://127.0.0.1:{tls_port}"), format!("https://127.0.0.1:{mutual_port}"));

    let (code, out, err, _) = run(tls.clone(), &["--ca-file", &ca]);
    assert_eq!(code, 0, "with the CA: {err}");
    assert!(out.contains("instances"), "{out}");

    // No --ca-file: the system's roots do not know the private CA.
    let (code, _, err, took) = run(tls.clone(), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("invalid peer certificate") && err.contains("give --ca-file"), "{err}");
    assert!(took < Duration::from_secs(5), "a certificate error is not a hang: {took:?}");

    // Another CA's --ca-file: the same refusal.
    let (code, _, err, _) = run(tls.clone(), &["--ca-file", other.ca.to_str().unwrap()]);
    assert!(code == 1 && err.contains("UnknownIssuer"), "{err}");

    // Plain http:// to the TLS port: told to use https://.
    let (code, _, err, took) = run(format!("http://127.0.0.1:{tls_port}"), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("(400)") && err.contains("serves HTTPS only: use https://"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // https:// to a plain directory.
    let (code, _, err, _) = run(format!("https://127.0.0.1:{plain_port}"), &["--ca-file", &ca]);
    assert!(code == 1 && err.contains("does not speak TLS"), "{err}");

    // Mutual TLS: no client certificate, another CA's, then the right one.
    let (code, _, err, took) = run(mutual.clone(), &["--ca-file", &ca]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("give --client-cert and --client-key"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let (other_cert, other_key) = (path_arg(&other.client_cert), path_arg(&other.client_key));
    let (code, _, err, _) =
        run(mutual.clone(), &["--ca-file", &ca, "--client-cert", &other_cert, "--client-key", &other_key]);
    assert!(code == 1 && err.contains("refused this client's certificate"), "{err}");
    let (code, _, err, _) = run(mutual.clone(), &pki.client_args(true).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "with the client certificate: {err}");
    let metrics =
        pki.http(true).get(format!("{mutual}/metrics")).send().await.unwrap().text().await.unwrap_or_default();
    assert!(metric(&metrics, "dstack_directory_tls_handshake_failures_total") >= 1, "{metrics}");

    // Bad flags are named.
    let (code, _, err, _) = run(tls.clone(), &["--client-cert", &ca]);
    assert!(code == 2 && err.contains("--client-cert needs --client-key"), "{err}");
    let (code, _, err, _) = run(tls.clone(), &["--ca-file", pki.server_key.to_str().unwrap()]);
    assert!(code == 1 && err.contains("--ca-file") && err.contains("no certificate in it"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_certificate_and_a_bad_one_is_not_taken() {
    let tmp = tempfile::Builder::new().prefix("dstack-tls").tempdir().unwrap();
    let home = tmp.path().join("home");
    let old = Pki::new(tmp.path(), "old");
    let new = Pki::new(tmp.path(), "new");
    // The directory reads its files from one place; rotation replaces them.
    let (cert, key) = (tmp.path().join("tls.pem"), tmp.path().join("tls.key"));
    let install = |pki: &Pki| {
        std::fs::copy(&pki.server_cert, &cert).unwrap();
        std::fs::copy(&pki.server_key, &key).unwrap();
    };
    install(&old);
    let args = vec!["--tls-cert".into(), path_arg(&cert), "--tls-key".into(), path_arg(&key)];
    let (port, directory) = directory(tmp.path(), &args).await;
    let base = format!("https://127.0.0.1:{port}");
    let status = |pki: &Pki| dw(&home, &["-d", &base, "status", "--ca-file", pki.ca.to_str().unwrap()]).0;
    assert_eq!((status(&old), status(&new)), (0, 1));

    // A key that does not match the certificate: the old pair stays.
    std::fs::copy(&new.server_cert, &cert).unwrap();
    directory.signal(libc::SIGHUP);
    directory.wait_for_log("TLS reload failed", Duration::from_secs(5)).await;
    assert_eq!(status(&old), 0, "the certificate in force stays");

    install(&new);
    directory.signal(libc::SIGHUP);
    directory.wait_for_log("TLS certificate and key reloaded", Duration::from_secs(5)).await;
    assert_eq!((status(&old), status(&new)), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watson_checks_https_instances_with_its_ca_file() {
    let tmp = tempfile::Builder::new().prefix("dstack-tls").tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "main");
    let (port, _directory) = directory(tmp.path(), &[]).await;
    let base = format!("http://127.0.0.1:{port}");
    let check = TlsInstance::start(&pki).await;
    let check_url = format!("https://localhost:{}/emitter/liveness_check", check.port);
    let url = format!("http://127.0.0.1:{}/emitter", check.port);
    let ca = path_arg(&pki.ca);
    let _trusting = Proc::start(
        tmp.path(),
        "watson",
        &["-d", &base, "emitter", &url, "1", "--check-url", &check_url, "--ca-file", &ca],
    );
    // The same check without the CA: never alive, and the log says why.
    let untrusting = Proc::start(tmp.path(), "watson", &["-d", &base, "barker", &url, "1", "--check-url", &check_url]);

    let http = reqwest::Client::new();
    let instances_url = format!("{base}/v1/instances");
    eventually(Duration::from_secs(10), "emitter registered after an https:// check", async || {
        let list = json(&http, &instances_url).await;
        list.as_array()?.iter().any(|i| i["service"] == "emitter").then_some(())
    })
    .await;
    assert!(check.served.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let log = untrusting.wait_for_log("liveness check failed", Duration::from_secs(10)).await;
    assert!(log.contains("WARN") && log.contains("give --ca-file"), "{log}");
    let list = json(&http, &instances_url).await;
    assert!(!list.as_array().unwrap().iter().any(|i| i["service"] == "barker"), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_is_cut_off_while_others_are_served() {
    let tmp = tempfile::Builder::new().prefix("dstack-tls").tempdir().unwrap();
    let limits = limits_file(tmp.path(), "d.yaml", "limits:\n  header_read_timeout: 1s\n");
    let (port, _directory) = directory(tmp.path(), &limits).await;
    let base = format!("http://127.0.0.1:{port}");

    let mut slow = tokio::net::TcpStream::connect(addr(port)).await.unwrap();
    slow.write_all(b"GET /v1/status HTTP/1.1\r\nHost: directory\r\n").await.unwrap();
    let stalled_at = Instant::now();

    // Others are served meanwhile, and a blocking query longer than the
    // header timeout is answered in full: the timeout is for the header.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let status = json(&http, &format!("{base}/v1/status")).await;
    let (epoch, index) = (status["epoch"].as_u64().unwrap(), status["index"].as_u64().unwrap());
    let started = Instant::now();
    let snapshot = json(&http, &format!("{base}/v1/snapshot?epoch={epoch}&index={index}&wait=2s")).await;
    assert!(started.elapsed() >= Duration::from_millis(1900), "it waited: {:?}", started.elapsed());
    assert_eq!(snapshot["index"].as_u64(), Some(index));

    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await;
    let after = stalled_at.elapsed();
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the slow client is disconnected: {read:?}");
    assert!(after >= Duration::from_millis(900) && after < Duration::from_secs(4), "after {after:?}");

    // A TLS port gives a client that connects and says nothing the same time.
    let pki = Pki::new(tmp.path(), "main");
    let mut args = limits_file(tmp.path(), "t.yaml", "limits:\n  header_read_timeout: 1s\n");
    args.extend(pki.server_args());
    let (tls_port, _tls) = directory(tmp.path(), &args).await;
    let mut silent = tokio::net::TcpStream::connect(addr(tls_port)).await.unwrap();
    let started = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    json(&pki.http(false), &format!("https://127.0.0.1:{tls_port}/v1/status")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_get_a_503_until_some_close() {
    let tmp = tempfile::Builder::new().prefix("dstack-tls").tempdir().unwrap();
    let limits = limits_file(tmp.path(), "d.yaml", "limits:\n  max_connections: 5\n");
    let (port, directory) = directory(tmp.path(), &limits).await;
    let base = format!("http://127.0.0.1:{port}");

    // Five idle connections hold every slot (for up to the 10 s header timeout).
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(tokio::net::TcpStream::connect(addr(port)).await.unwrap());
    }
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).pool_max_idle_per_host(0).build().unwrap();
    let started = Instant::now();
    let resp = http.get(format!("{base}/v1/status")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("5 connections open, its limit (limits.max_connections)"));
    assert!(started.elapsed() < Duration::from_secs(2), "refused at once: {:?}", started.elapsed());
    let (code, _, err, _) = dw(tmp.path(), &["-d", &base, "status"]);
    assert!(code == 1 && err.contains("(503)") && err.contains("limits.max_connections"), "{err}");
    directory.wait_for_log("connection limit reached", Duration::from_secs(5)).await;

    drop(held);
    let metrics = eventually(Duration::from_secs(5), "a slot to free up", async || {
        let resp = http.get(format!("{base}/metrics")).send().await.ok()?;
        if resp.status() != 200 {
            return None;
        }
        resp.text().await.ok()
    })
    .await;
    assert!(metric(&metrics, "dstack_directory_connections_refused_total") >= 2, "{metrics}");
    assert!(metric(&metrics, "dstack_directory_connections_open") <= 5, "{metrics}");
}

/// What TLS costs, plain against TLS on one machine (run in release:
/// `cargo test --release --test tls -- --ignored --nocapture what_tls_costs`):
/// a heartbeat on a kept-alive connection, a request on a new connection
/// (a handshake each), and a full snapshot of 1,000 instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn what_tls_costs() {
    use dstack::client::DirectoryClient;
    use dstack::model::{Heartbeat, InstanceId, SnapshotId};
    let tmp = tempfile::Builder::new().prefix("dstack-tls").tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "main");
    let (plain_port, _plain) = directory(tmp.path(), &["--max-ttl".into(), "10m".into()]).await;
    let mut args = pki.server_args();
    args.extend(["--max-ttl".into(), "10m".into()]);
    let (tls_port, _tls) = directory(tmp.path(), &args).await;
    let files = dstack::tls::ClientTlsFiles { ca_file: Some(pki.ca.clone()), ..Default::default() };
    let tls = dstack::tls::ClientTls::for_directory(&files).unwrap();
    let summary = |mut took: Vec<Duration>| {
        took.sort();
        let total: Duration = took.iter().sum();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        (took.len() as f64 / total.as_secs_f64(), us(took[took.len() / 2]), us(took[took.len() * 99 / 100]))
    };
    println!("| what | plain | TLS |\n|---|---|---|");
    let mut rows: Vec<(String, String)> = Vec::new();
    for (name, base) in
        [("plain", format!("http://127.0.0.1:{plain_port}")), ("tls", format!("https://127.0.0.1:{tls_port}"))]
    {
        let client = DirectoryClient::with_tls(base.parse().unwrap(), Duration::from_secs(10), &tls);
        // 1,000 instances, so that a snapshot has some weight.
        for i in 0..1000 {
            let hb: Heartbeat = serde_json::from_value(serde_json::json!({
                "service": format!("svc{}", i % 100), "version": "v1",
                "url": format!("http://10.1.{}.{}:8080/app", i / 250, i % 250), "ttl_ms": 600_000
            }))
            .unwrap();
            client.heartbeat(&format!("i{i}").parse::<InstanceId>().unwrap(), &hb).await.unwrap();
        }
        let hb: Heartbeat = serde_json::from_value(serde_json::json!({
            "service": "svc0", "version": "v1", "url": "http://10.1.0.0:8080/app", "ttl_ms": 600_000
        }))
        .unwrap();
        let id: InstanceId = "i0".parse().unwrap();
        let mut took = Vec::new();
        for _ in 0..5000 {
            let started = Instant::now();
            client.heartbeat(&id, &hb).await.unwrap();
            took.push(started.elapsed());
        }
        let (rate, p50, p99) = summary(took);
        rows.push((
            format!("heartbeat, kept-alive ({name})"),
            format!("{rate:.0}/s, p50 {p50:.0} µs, p99 {p99:.0} µs"),
        ));
        let fresh = tls.reqwest().pool_max_idle_per_host(0).build().unwrap();
        let mut took = Vec::new();
        for _ in 0..500 {
            let started = Instant::now();
            let resp = fresh.put(format!("{base}/v1/instances/i0")).json(&hb).send().await.unwrap();
            assert!(resp.status().is_success());
            resp.bytes().await.unwrap();
            took.push(started.elapsed());
        }
        let (rate, p50, p99) = summary(took);
        rows.push((
            format!("heartbeat, new connection ({name})"),
            format!("{rate:.0}/s, p50 {p50:.0} µs, p99 {p99:.0} µs"),
        ));
        let mut took = Vec::new();
        let mut bytes = 0;
        for _ in 0..300 {
            let started = Instant::now();
            let snapshot = client.snapshot(SnapshotId::default(), Duration::ZERO, None).await.unwrap();
            took.push(started.elapsed());
            bytes = serde_json::to_vec(&snapshot).unwrap().len();
        }
        let (rate, p50, p99) = summary(took);
        rows.push((
            format!("full snapshot, {} KiB, kept-alive ({name})", bytes / 1024),
            format!("{rate:.0}/s, p50 {p50:.0} µs, p99 {p99:.0} µs"),
        ));
    }
    let half = rows.len() / 2;
    for i in 0..half {
        let what = rows[i].0.replace(" (plain)", "");
        println!("| {what} | {} | {} |", rows[i].1, rows[half + i].1);
    }
}
