//! Sherlock trusts nothing it reads: a forged snapshot, from a directory or
//! planted in its run dir, never reaches haproxy.cfg (issue 9's attacks),
//! and a run or state dir that others may write is refused.
//!
//! The attack: a `commit` holding a newline, a `program` section, and a `#`
//! that comments out the rest of the template's line. Rendered unchecked,
//! the HAProxy master starts the program; here it would create a marker
//! file. The first test shows the payload works on HAProxy when it gets
//! into a config, so the marker's absence in the others means something.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::IntoResponse as _;
use common::*;
use dstack::sherlock::render::{Renderer, Site};

/// The forged commit: its program would create `marker`.
fn payload(marker: &Path) -> String {
    format!("abc1234\nprogram pwned\n    command /usr/bin/touch {}\n#", marker.display())
}

/// A snapshot as a directory serves it, with one service whose backend is
/// `backend_port`, and `commit`.
fn snapshot(index: u64, commit: &str, services: &[(&str, u16)]) -> String {
    let services: serde_json::Map<String, serde_json::Value> = services
        .iter()
        .map(|(name, port)| {
            let backend = serde_json::json!({
                "id": format!("{name}-v1-1"),
                "url": format!("http://127.0.0.1:{port}/{name}"),
                "version": "v1",
                "weight": 1,
            });
            (name.to_string(), serde_json::json!({ "backends": [backend] }))
        })
        .collect();
    serde_json::json!({
        "epoch": 1_700_000_000_000_000u64,
        "index": index,
        "commit": commit,
        "warming": false,
        "services": services,
        "warnings": [],
    })
    .to_string()
}

/// A run dir of this user's, mode 0700, as sherlock would make it.
fn run_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// Starts sherlock following `directory`, with its run dir, listen port and
/// admin port; returns once its HAProxy answers.
async fn sherlock(tmp: &Path, run_dir: &Path, directory: &str) -> (Proc, u16, u16) {
    let port = free_port();
    let admin = free_port();
    let (listen, admin_addr) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{admin}"));
    let args = [
        "-d",
        directory,
        "--listen",
        &listen,
        "--admin",
        &admin_addr,
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--name",
        "untrusting",
    ];
    let proc = Proc::start(tmp, "sherlock", &args);
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/");
    eventually(Duration::from_secs(15), "sherlock's haproxy to listen", async || http.get(&url).send().await.ok())
        .await;
    (proc, port, admin)
}

async fn admin_status(admin: u16) -> serde_json::Value {
    let url = format!("http://127.0.0.1:{admin}/status");
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// The marker never appears: checked for long enough that a reload (a few
/// hundred milliseconds at most) and the master's start of a program would
/// have happened.
async fn assert_never_created(marker: &Path, log: &str) {
    for _ in 0..30 {
        assert!(!marker.exists(), "the injected program ran: {} exists; log:\n{log}", marker.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Control: the payload, in a config rendered the way an unchecked renderer
/// would write it, makes HAProxy's master run the program.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payload_runs_a_program_when_it_reaches_haproxy() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("pwned");
    let site = Site { bind: format!("127.0.0.1:{}", free_port()), admin_socket: tmp.path().join("admin.sock") };
    let clean: dstack::model::Snapshot = serde_json::from_str(&snapshot(2, "abc1234", &[])).unwrap();
    let config = Renderer::new(None).unwrap().render(&site, &clean).unwrap();
    let forged = config.replacen("(routes commit abc1234)", &format!("(routes commit {})", payload(&marker)), 1);
    // Run without sherlock, which would hand it the listening socket (fd 3).
    let forged = forged.replacen("bind fd@3", &format!("bind {}", site.bind), 1);
    assert!(forged.contains("\nprogram pwned\n"), "{forged}");
    let cfg = tmp.path().join("haproxy.cfg");
    std::fs::write(site.services_map(), dstack::sherlock::render::render_map(&clean).unwrap()).unwrap();
    std::fs::write(&cfg, &forged).unwrap();
    let mut haproxy = std::process::Command::new("haproxy")
        .args(["-W", "-db", "-f"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ran =
        eventually(Duration::from_secs(10), "the injected program to run", async || marker.exists().then_some(()));
    let ran = tokio::time::timeout(Duration::from_secs(11), ran).await;
    // SAFETY: signalling our own child; SIGTERM ends the master and its children.
    unsafe { libc::kill(haproxy.id() as i32, libc::SIGTERM) };
    haproxy.wait().unwrap();
    assert!(ran.is_ok(), "the payload did not run; the other tests would prove nothing");
}

/// What the fake directory serves, and how often it was asked.
#[derive(Clone, Default)]
struct Served {
    body: Arc<Mutex<String>>,
}

#[derive(serde::Deserialize)]
struct Held {
    #[serde(default)]
    index: u64,
}

/// `GET /v1/snapshot`: the body served now. A query that already holds its
/// index waits a little, as a real blocking query does, so sherlock does not
/// spin.
async fn serve_snapshot(State(served): State<Served>, Query(held): Query<Held>) -> axum::response::Response {
    let body = served.body.lock().unwrap().clone();
    let index = serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["index"].as_u64());
    if index == Some(held.index) {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let body = served.body.lock().unwrap().clone();
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A directory that serves whatever the test puts in `Served`; with
/// `silent`, one that never answers (so no error of its own replaces what
/// sherlock's status says).
async fn fake_directory(served: Served, silent: bool) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = if silent {
        axum::Router::new().route("/v1/snapshot", axum::routing::get(std::future::pending::<String>))
    } else {
        axum::Router::new().route("/v1/snapshot", axum::routing::get(serve_snapshot)).with_state(served)
    };
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.ok();
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_commit_from_a_directory_is_refused_and_the_running_config_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("pwned");
    let emitter = Instance::start("emitter-1").await;
    let later = Instance::start("later-1").await;
    let served = Served::default();
    *served.body.lock().unwrap() = snapshot(1, "abc1234", &[("emitter", emitter.port)]);
    let (directory, server) = fake_directory(served.clone(), false).await;
    let run = run_dir(tmp.path(), "run");
    let (sherlock, port, admin) = sherlock(tmp.path(), &run, &directory).await;
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    eventually(Duration::from_secs(15), "the first snapshot applied", async || {
        let (status, body) = get_via(&http, port, "/emitter/").await.ok()?;
        (status == 200 && body.starts_with("emitter-1")).then_some(())
    })
    .await;

    // The forged snapshot: the same services, and the payload in `commit`.
    *served.body.lock().unwrap() = snapshot(2, &payload(&marker), &[("emitter", emitter.port)]);
    assert_never_created(&marker, &sherlock.log_text()).await;
    let error = eventually(Duration::from_secs(10), "the refusal in /status", async || {
        admin_status(admin).await["last_error"].as_str().map(str::to_string)
    })
    .await;
    assert!(error.contains("sent a snapshot that was refused"), "{error}");
    assert!(error.contains("a commit is 7 to 64 lowercase hex digits"), "{error}");
    let log = sherlock.log_text();
    assert!(log.contains("snapshot refused; keeping the running config"), "{log}");
    assert!(log.contains("a commit is 7 to 64 lowercase hex digits"), "{log}");
    let cfg = std::fs::read_to_string(run.join("haproxy.cfg")).unwrap();
    assert!(!cfg.contains("program") && !cfg.contains("pwned"), "{cfg}");
    assert!(cfg.starts_with("# Rendered by dstack sherlock from snapshot 1 (routes commit abc1234).\n"), "{cfg}");
    let status = admin_status(admin).await;
    assert_eq!((status["applied_index"].as_u64(), status["haproxy_running"].as_bool()), (Some(1), Some(true)));
    // Traffic still flows on the running config.
    let (code, body) = get_via(&http, port, "/emitter/").await.unwrap();
    assert_eq!((code, body.split(' ').next()), (200, Some("emitter-1")));

    // The next good snapshot is applied: refusing one is no outage.
    *served.body.lock().unwrap() = snapshot(3, "def5678", &[("emitter", emitter.port), ("later", later.port)]);
    eventually(Duration::from_secs(20), "the next good snapshot applied", async || {
        let (status, body) = get_via(&http, port, "/later/").await.ok()?;
        (status == 200 && body.starts_with("later-1")).then_some(())
    })
    .await;
    assert_never_created(&marker, &sherlock.log_text()).await;
    let cfg = std::fs::read_to_string(run.join("haproxy.cfg")).unwrap();
    assert!(!cfg.contains("program"), "{cfg}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_snapshot_json_is_refused_and_sherlock_starts_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("pwned");
    let emitter = Instance::start("emitter-1").await;
    // No directory answers: what sherlock serves comes from the file alone.
    let (nowhere, server) = fake_directory(Served::default(), true).await;
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();

    // Control: a clean saved snapshot is served at once.
    let clean_run = run_dir(tmp.path(), "clean");
    std::fs::write(clean_run.join("snapshot.json"), snapshot(4, "abc1234", &[("emitter", emitter.port)])).unwrap();
    let (_clean, clean_port, _) = sherlock(tmp.path(), &clean_run, &nowhere).await;
    let (code, body) = get_via(&http, clean_port, "/emitter/").await.unwrap();
    assert_eq!((code, body.split(' ').next()), (200, Some("emitter-1")), "the saved snapshot is served");

    // The planted one: the same, with the payload in `commit`.
    let run = run_dir(tmp.path(), "run");
    std::fs::write(run.join("snapshot.json"), snapshot(4, &payload(&marker), &[("emitter", emitter.port)])).unwrap();
    let (sherlock, port, admin) = sherlock(tmp.path(), &run, &nowhere).await;
    assert_never_created(&marker, &sherlock.log_text()).await;
    let log = sherlock.log_text();
    assert!(log.contains("saved snapshot refused; starting with no services"), "{log}");
    assert!(log.contains(r#"snapshot.json: not a valid snapshot: commit "abc1234\nprogram pwned"#), "{log}");
    let cfg = std::fs::read_to_string(run.join("haproxy.cfg")).unwrap();
    assert!(!cfg.contains("program") && !cfg.contains("emitter"), "started empty: {cfg}");
    let (code, _) = get_via(&http, port, "/emitter/").await.unwrap();
    assert_eq!(code, 404, "no service until a directory answers");
    let error = admin_status(admin).await["last_error"].as_str().unwrap_or_default().to_string();
    assert!(error.starts_with("saved snapshot refused: "), "{error}");
    assert!(error.contains("a commit is 7 to 64 lowercase hex digits"), "{error}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_dir_or_state_dir_others_may_write_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let shared = shared.to_str().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    for (bin, args) in [
        ("sherlock", vec!["-d", "127.0.0.1:1", "--listen", &listen, "--admin", "off", "--run-dir", shared]),
        ("directory", vec!["--listen", &listen, "--state-dir", shared]),
    ] {
        let out = std::process::Command::new(common::bin(bin)).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bin}: {stderr}");
        let flag = if bin == "sherlock" { "--run-dir" } else { "--state-dir" };
        let want = format!("{flag} {shared}: owned by uid");
        assert!(stderr.contains(&want), "{bin}: {stderr}");
        assert!(stderr.contains("with mode 0777, so its group and every user may write it"), "{bin}: {stderr}");
    }
    // A fresh one is made 0700.
    let fresh = tmp.path().join("fresh/run");
    let (_sherlock, _, _) = sherlock(tmp.path(), &fresh, "127.0.0.1:1").await;
    assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);
}
