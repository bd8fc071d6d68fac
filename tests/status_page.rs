//! The directory's status page in a real browser: headless Chromium loads
//! `/` from a cluster (directory, watsons, sherlock, a routes repo), and the
//! page follows an instance joining and leaving and a rejected commit, live,
//! without a reload. It saves a screenshot: into `DSTACK_SCREENSHOT` if set
//! (`DSTACK_SCREENSHOT=docs/status-page.png cargo test --test status_page`
//! makes the README's), else into the test's temp dir; and one at a phone's
//! width into `DSTACK_SCREENSHOT_PHONE` (or the temp dir).
//!
//! Chromium is driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: JSON messages ended by a NUL byte on fds 3
//! and 4), with serde_json: no crate, no driver, no port, and the browser
//! is the test's own child, ended (its whole process group) when the test
//! ends, however it ends.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium, its first page attached.
struct Chromium {
    child: Child,
    commands: Mutex<File>,
    replies: Mutex<mpsc::Receiver<Value>>,
    next_id: AtomicU64,
    /// The page's DevTools session.
    session: String,
    /// Its profile, fresh for every run.
    _profile: tempfile::TempDir,
}

/// A pipe whose ends are above fd 10 and close on exec, so that the child's
/// `dup2` onto 3 and 4 overwrites neither.
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let high = |fd: i32| {
        // SAFETY: fd is ours; the duplicate is owned by the OwnedFd.
        unsafe {
            let dup = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
            assert!(dup >= 10);
            libc::close(fd);
            OwnedFd::from_raw_fd(dup)
        }
    };
    (high(fds[0]), high(fds[1]))
}

impl Chromium {
    fn start(log: &Path, ignore_certificate_errors: bool) -> Chromium {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: run scripts/install-deps.sh (Debian's chromium package)"
        );
        let profile = tempfile::Builder::new().prefix("dstack-chromium").tempdir().unwrap();
        let (to_chromium, commands) = pipe();
        let (replies, from_chromium) = pipe();
        let mut command = Command::new(CHROMIUM);
        command.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-pipe",
            "--hide-scrollbars",
            &format!("--user-data-dir={}", profile.path().join("profile").display()),
        ]);
        if ignore_certificate_errors {
            // The cluster's private CA: the page is under test, not TLS.
            command.arg("--ignore-certificate-errors");
        }
        command.arg("about:blank");
        // Its crash database, caches and singleton socket go in the temp
        // dir too, not in the user's home or the shared /tmp.
        for (var, sub) in
            [("HOME", "home"), ("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache"), ("TMPDIR", "tmp")]
        {
            let path = profile.path().join(sub);
            std::fs::create_dir_all(&path).unwrap();
            command.env(var, path);
        }
        let file = File::create(log).unwrap();
        command.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file).process_group(0);
        let (read_fd, write_fd) = (to_chromium.as_raw_fd(), from_chromium.as_raw_fd());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(read_fd, 3) < 0 || libc::dup2(write_fd, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("starting chromium");
        drop((to_chromium, from_chromium));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(File::from(replies));
            let mut buf = Vec::new();
            while matches!(reader.read_until(0, &mut buf), Ok(n) if n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(message) = serde_json::from_slice::<Value>(&buf) {
                    if tx.send(message).is_err() {
                        return;
                    }
                }
                buf.clear();
            }
        });
        let mut chromium = Chromium {
            child,
            commands: Mutex::new(File::from(commands)),
            replies: Mutex::new(rx),
            next_id: AtomicU64::new(1),
            session: String::new(),
            _profile: profile,
        };
        let target = chromium.call("Target.createTarget", json!({"url": "about:blank"}));
        let target = target["targetId"].as_str().unwrap().to_string();
        let attached = chromium.call("Target.attachToTarget", json!({"targetId": target, "flatten": true}));
        chromium.session = attached["sessionId"].as_str().unwrap().to_string();
        chromium
    }

    /// Sends a browser command, or a page command once attached; its result.
    fn call(&self, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands.lock().unwrap().write_all(&bytes).expect("chromium's command pipe");
        let replies = self.replies.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply =
                replies.recv_timeout(left).unwrap_or_else(|e| panic!("no answer to {method} from chromium: {e}"));
            if reply["id"] == id {
                assert!(reply.get("error").is_none(), "{method}: {}", reply["error"]);
                return reply["result"].clone();
            }
            // An event: not asked for, not needed.
        }
    }

    /// Evaluates `expression` in the page; its value as JSON.
    fn eval(&self, expression: &str) -> Value {
        let result = self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true}));
        assert!(result.get("exceptionDetails").is_none(), "{expression}: {}", result["exceptionDetails"]);
        result["result"]["value"].clone()
    }

    /// A PNG of the whole page at `width` CSS pixels.
    fn screenshot(&self, width: u32, height: u32, mobile: bool) -> Vec<u8> {
        let metrics = json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile});
        self.call("Emulation.setDeviceMetricsOverride", metrics);
        // Laid out again at the new width before measuring.
        self.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))");
        let full = self.eval("document.documentElement.scrollHeight").as_f64().unwrap();
        let clip = json!({"x": 0, "y": 0, "width": width, "height": full.max(f64::from(height)), "scale": 1});
        let shot =
            self.call("Page.captureScreenshot", json!({"format": "png", "clip": clip, "captureBeyondViewport": true}));
        base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap()
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // Asked first, it also ends its crash handler (a process of its own
        // group); then whatever is left of its group, zygote and renderers.
        let mut message = serde_json::to_vec(&json!({"id": 0, "method": "Browser.close"})).unwrap();
        message.push(0);
        let _ = self.commands.lock().map(|mut c| c.write_all(&message));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: signalling the group of our own child.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Runs a blocking DevTools call without stalling the runtime that serves
/// the test's instances.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// What the page shows now, read from its DOM.
const READ_PAGE: &str = r##"(() => {
  const text = (e) => e ? e.textContent : null;
  const rejected = document.getElementById("rejected");
  return {
    marker: window.__dstackMarker || null,
    live: document.getElementById("live").className,
    commit: text(document.getElementById("commit")),
    rejected: rejected.hidden ? null : rejected.textContent,
    warnings: [...document.querySelectorAll("#warnings li")].map(text),
    sherlocks: [...document.querySelectorAll(".sherlock")].map(text),
    versions: [...document.querySelectorAll(".service")].flatMap((s) =>
      [...s.querySelectorAll(".version")].map((v) => ({
        service: s.dataset.service,
        version: v.dataset.version,
        nums: text(v.querySelector(".nums")),
        bars: v.querySelectorAll(".bar").length,
        instances: [...v.querySelectorAll(".instance")].map(text),
      }))),
  };
})()"##;

/// The versions the page shows for `service`, by name.
fn version<'a>(page: &'a Value, service: &str, version: &str) -> Option<&'a Value> {
    page["versions"].as_array()?.iter().find(|v| v["service"] == service && v["version"] == version)
}

/// The instance rows of one version.
fn rows(page: &Value, service: &str, v: &str) -> Vec<String> {
    version(page, service, v)
        .and_then(|v| v["instances"].as_array())
        .map(|rows| rows.iter().map(|r| r.as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}

/// The "now N%" of a version's numbers.
fn share(page: &Value, service: &str, v: &str) -> Option<f64> {
    let nums = version(page, service, v)?["nums"].as_str()?;
    nums.split("now ").nth(1)?.trim_end_matches('%').parse().ok()
}

/// Waits until the page shows what `ready` wants, checking each time that
/// it was never reloaded (the marker set in it stays); the last reading.
async fn until(chromium: &Chromium, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = blocking(|| chromium.eval(READ_PAGE));
        assert_eq!(page["marker"], "kept", "the page was reloaded: {page:#}");
        if ready(&page) {
            return page;
        }
        if Instant::now() > deadline {
            panic!("the page never showed {what}; it shows:\n{page:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The page's address, with the operator's token as the Basic password
/// in secure mode (what a person types when the browser asks).
fn page_url(cluster: &Cluster) -> String {
    match &cluster.security {
        None => format!("{}/", cluster.directory_url()),
        Some(s) => {
            let token = std::fs::read_to_string(&s.operator_token).unwrap();
            format!("https://ops:{}@127.0.0.1:{}/", token.trim(), cluster.directory_port)
        }
    }
}

fn screenshot_path(dir: &Path) -> PathBuf {
    match std::env::var_os("DSTACK_SCREENSHOT") {
        Some(path) => PathBuf::from(path),
        None => dir.join("status-page.png"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_follows_an_instance_joining_and_leaving_live() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let canary = repo.commit(
        &[("routes/barker.yaml", "# the canary: v2 gets 10%\nbarker:\n  v1: 90\n  v2: 10\n")],
        "barker: a 90/10 canary of v2",
    );
    let url = repo.url();
    let cluster = Cluster::start_with(&["--repo", &url, "--poll", "1h"]).await;
    let (_barkers, _barker_watsons) = cluster.fleet("barker", &["v1", "v1"]).await;
    let (_emitters, _emitter_watsons) = cluster.fleet("emitter", &["v1"]).await;
    cluster.wait_for_instances("barker", 2).await;
    cluster.wait_for_commit(canary).await;

    let chromium = blocking(|| Chromium::start(&tmp.path().join("chromium.log"), cluster.security.is_some()));
    let address = page_url(&cluster);
    blocking(|| chromium.call("Page.navigate", json!({"url": address})));
    let short = canary.to_string()[..12].to_string();
    let page = blocking(|| {
        // Until the script has run once; then mark the page, so any reload shows.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = chromium.eval("document.querySelectorAll('.service').length > 0");
            if ready == true {
                return chromium.eval("window.__dstackMarker = 'kept'");
            }
            assert!(Instant::now() < deadline, "the page never drew a service: {}", chromium.eval(READ_PAGE));
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    assert_eq!(page, "kept");
    let page = until(&chromium, "two healthy v1 instances, the commit in force and the sherlock", |p| {
        rows(p, "barker", "v1").iter().filter(|r| r.contains("healthy")).count() == 2
            && rows(p, "barker", "v2") == ["● noneno live instance"]
            && p["commit"].as_str().is_some_and(|c| c.contains(&short))
            && p["sherlocks"].as_array().is_some_and(|s| s.len() == 1 && s[0].as_str().unwrap().contains("in sync"))
    })
    .await;
    assert!(page["live"].as_str().unwrap().contains("ok"), "{page:#}");
    assert_eq!(version(&page, "barker", "v1").unwrap()["bars"], 2, "desired and effective");
    assert_eq!(version(&page, "emitter", "v1").unwrap()["bars"], 1, "no route: the effective share alone");
    assert_eq!(share(&page, "barker", "v1"), Some(100.0), "{page:#}");

    // An instance joins: v2 gets its 10%.
    let joining = Instance::start("v2-canary").await;
    let joining_url = joining.url("/barker");
    let mut watson = cluster.watson("barker", &joining_url, &["--version", "v2"]);
    let page = until(&chromium, "the v2 instance, healthy, with about 10% of barker", |p| {
        let v2 = rows(p, "barker", "v2");
        v2.len() == 1
            && v2[0].contains(&joining_url)
            && v2[0].contains("healthy")
            && share(p, "barker", "v2").is_some_and(|s| (s - 10.0).abs() <= 0.5)
    })
    .await;
    assert!(version(&page, "barker", "v2").unwrap()["nums"].as_str().unwrap().starts_with("desired 10%"), "{page:#}");

    // A commit whose weights do not sum to 100: shown with its error, and
    // the canary stays in force.
    repo.commit(&[("routes/barker.yaml", "barker:\n  v1: 90\n  v2: 30\n")], "barker: too much v2");
    cluster.reconcile().await;
    let page = until(&chromium, "the rejected commit and its error, and the sherlock in sync", |p| {
        p["rejected"].as_str().is_some_and(|r| r.contains("routes/barker.yaml:") && r.contains("120"))
            && p["sherlocks"][0].as_str().is_some_and(|s| s.contains("in sync"))
    })
    .await;
    assert!(page["commit"].as_str().unwrap().contains(&short), "{page:#}");
    assert!(page["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains("rejected")), "{page:#}");

    // The screenshot, as wide as a laptop's window; then on a phone, where
    // nothing may be wider than the screen.
    let png = blocking(|| chromium.screenshot(1000, 700, false));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "{} bytes", png.len());
    let path = screenshot_path(tmp.path());
    std::fs::write(&path, &png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    let phone = blocking(|| chromium.screenshot(390, 844, true));
    let path = match std::env::var_os("DSTACK_SCREENSHOT_PHONE") {
        Some(path) => PathBuf::from(path),
        None => tmp.path().join("status-page-phone.png"),
    };
    std::fs::write(&path, &phone).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    let overflow = blocking(|| chromium.eval("document.documentElement.scrollWidth - window.innerWidth"));
    assert!(overflow.as_f64().is_some_and(|o| o <= 0.0), "wider than a phone's screen by {overflow} px");
    blocking(|| chromium.call("Emulation.clearDeviceMetricsOverride", json!({})));

    // It leaves (its watson deregisters it at SIGTERM): v2 has no live
    // instance any more, and the snapshot's warning says so.
    watson.stop();
    let page = until(&chromium, "v2 with no live instance", |p| {
        rows(p, "barker", "v2") == ["● noneno live instance"] && share(p, "barker", "v2") == Some(0.0)
    })
    .await;
    assert!(!page.to_string().contains(&joining_url), "{page:#}");
    assert_eq!(share(&page, "barker", "v1"), Some(100.0), "{page:#}");
    assert!(page["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains("v2")), "{page:#}");
}
