//! Sherlock under faults: a dead HAProxy restarted for good, sherlock as a
//! container's PID 1, files that a failed write cannot half-apply, and a
//! hung instance taken out of traffic (README, "Sherlock and HAProxy").

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// An HAProxy whose starts fail while `mode` holds `fail` (it says so on
/// stderr and exits 1) and hang while it holds `hang` (a master that never
/// answers); else the real one. A shell script.
fn flaky_haproxy(dir: &Path, mode: &Path) -> PathBuf {
    let script = dir.join("flaky-haproxy");
    let text = format!(
        "#!/bin/sh\nmode=$(cat '{}' 2>/dev/null)\n\
         if [ \"$mode\" = fail ]; then echo 'flaky-haproxy: failing on purpose' >&2; exit 1; fi\n\
         if [ \"$mode\" = hang ] && [ \"$1\" != -c ]; then exec sleep 60; fi\n\
         exec haproxy \"$@\"\n",
        mode.display()
    );
    std::fs::write(&script, text).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// The pid of the HAProxy master whose master socket is in `run_dir`.
fn master_pid(run_dir: &Path) -> i32 {
    let text = socket_command(&run_dir.join("master.sock"), "show proc");
    text.lines()
        .find_map(|l| match l.split_whitespace().collect::<Vec<_>>().as_slice() {
            [pid, "master", ..] => pid.parse().ok(),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no master in `show proc`:\n{text}"))
}

/// SIGKILL to a process that is not our child.
fn kill9(pid: i32) {
    // SAFETY: a plain kill(2) of a pid read from HAProxy's own CLI.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill -9 {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_haproxy_is_restarted_with_backoff_for_good_and_status_says_so_meanwhile() {
    let cluster = Cluster::start().await;
    let mode = cluster.dir.path().join("haproxy-mode");
    let wrapper = flaky_haproxy(cluster.dir.path(), &mode);
    let (port, sherlock) = cluster.start_sherlock(&["--haproxy", wrapper.to_str().unwrap()]).await;
    let _fleet = cluster.fleet("emitter", &["v1"]).await;
    cluster.wait_for_instances("emitter", 1).await;
    let run_dir = cluster.run_dir(port);
    assert_eq!(get_via(&cluster.http, port, "/emitter/").await.unwrap().0, 200);

    // The master dies: its workers follow it, and a new master serves the
    // port at once. Requests go back to back meanwhile, each on a new
    // connection: sherlock holds the listening socket, so a connection made
    // while no HAProxy runs waits in its queue instead of being refused.
    // Only those the dying worker accepted may fail (one, two at most).
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let old_master = master_pid(&run_dir);
    kill9(old_master);
    let killed = Instant::now();
    let mut failed = Vec::new();
    loop {
        match get_via(&http, port, "/emitter/").await {
            Ok((200, _)) => {
                let new_master = try_socket_command(&run_dir.join("master.sock"), "show proc").ok().and_then(|t| {
                    t.lines()
                        .find_map(|l| l.split_whitespace().next()?.parse::<i32>().ok().filter(|p| *p != old_master))
                });
                if new_master.is_some() {
                    break;
                }
            }
            other => failed.push(other),
        }
        assert!(killed.elapsed() < Duration::from_secs(20), "no new master serving 20s after the kill");
    }
    println!("a SIGKILL of haproxy's master: new master in {:?}, failed requests {failed:?}", killed.elapsed());
    assert!(failed.len() <= 2, "clients failed while the master was replaced: {failed:?}");
    eventually(Duration::from_secs(10), "status to say haproxy runs", async || {
        (cluster.sherlock_status(port).await["haproxy_running"] == true).then_some(())
    })
    .await;

    // It dies again, and every start fails for a while: sherlock keeps
    // trying, and says HAProxy is down and why.
    std::fs::write(&mode, "fail").unwrap();
    kill9(master_pid(&run_dir));
    let failed_starts = async || cluster.sherlock_metric(port, "dstack_sherlock_haproxy_failed_starts_total").await;
    let failed = eventually(Duration::from_secs(20), "three failed restarts", async || {
        let n = failed_starts().await;
        (n >= 3).then_some(n)
    })
    .await;
    let status = cluster.sherlock_status(port).await;
    assert_eq!(status["haproxy_running"], false, "{status}");
    let error = status["haproxy_error"].as_str().unwrap_or_default();
    assert!(error.contains("flaky-haproxy: failing on purpose"), "{status}");
    assert_eq!(cluster.sherlock_metric(port, "dstack_sherlock_haproxy_up").await, 0);
    assert!(get_via(&cluster.http, port, "/emitter/").await.is_err(), "nothing listens while it is down");

    // A start that hangs (a master that never answers) is given up after
    // its limit and tried again, not waited on for good.
    std::fs::write(&mode, "hang").unwrap();
    eventually(Duration::from_secs(40), "a start that hung to count as failed", async || {
        (failed_starts().await > failed + 1).then_some(())
    })
    .await;
    let status = cluster.sherlock_status(port).await;
    assert!(status["haproxy_error"].as_str().unwrap_or_default().contains("did not become ready"), "{status}");

    // The cause goes away: the next try succeeds, and status says so.
    std::fs::remove_file(&mode).unwrap();
    eventually(Duration::from_secs(30), "haproxy back after the failures", async || {
        (get_via(&http, port, "/emitter/").await.ok()?.0 == 200).then_some(())
    })
    .await;
    let status = eventually(Duration::from_secs(10), "status to say haproxy runs", async || {
        let status = cluster.sherlock_status(port).await;
        (status["haproxy_running"] == true).then_some(status)
    })
    .await;
    assert_eq!(status["haproxy_error"], serde_json::Value::Null, "{status}");
    assert_eq!(cluster.sherlock_metric(port, "dstack_sherlock_haproxy_up").await, 1);
    assert_eq!(cluster.sherlock_metric(port, "dstack_sherlock_haproxy_restarts_total").await, 2);
    assert_eq!(cluster.sherlock_metric(port, "dstack_sherlock_haproxy_exits_total").await, 2);
    drop(sherlock);
}

/// `/proc/PID/stat`'s state letter and parent pid.
fn proc_state(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.next()?.parse().ok()?))
}

/// Pids whose parent is `parent`.
fn children_of(parent: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| proc_state(*pid).is_some_and(|(_, ppid)| ppid == parent))
        .collect()
}

/// How this machine lets a test start a process as PID 1 of a new PID
/// namespace (`unshare`'s flags), or why it does not.
fn pid_namespace_flags() -> Result<Vec<&'static str>, String> {
    // As root, a PID namespace needs nothing more; otherwise a user
    // namespace that maps us to root makes one (where the kernel allows).
    let mut tried = Vec::new();
    for flags in
        [vec!["--pid", "--fork", "--mount-proc"], vec!["--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]]
    {
        let out = std::process::Command::new("unshare").args(&flags).arg("true").output();
        match out {
            Ok(out) if out.status.success() => return Ok(flags),
            Ok(out) => {
                tried.push(format!("unshare {}: {}", flags.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
            }
            Err(e) => tried.push(format!("unshare: {e}")),
        }
    }
    Err(tried.join("; "))
}

/// A process started outside the harness's `Proc` (it runs our binaries
/// only); SIGKILL when dropped.
struct Spawned(std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_sherlock_starts_haproxy_reaps_orphans_and_stops_on_sigterm() {
    let flags = match pid_namespace_flags() {
        Ok(flags) => flags,
        Err(why) => {
            // CI runs as root on Debian, where this does not happen.
            eprintln!("SKIPPED: this machine cannot make a PID namespace for the test ({why})");
            return;
        }
    };
    let cluster = Cluster::start().await;
    let _fleet = cluster.fleet("emitter", &["v1"]).await;
    cluster.wait_for_instances("emitter", 1).await;
    let port = free_port();
    let run_dir = cluster.dir.path().join("pid1-run");
    let log = cluster.dir.path().join("pid1-sherlock.log");
    let file = std::fs::File::create(&log).unwrap();
    let directory = cluster.directory_url();
    let listen = format!("127.0.0.1:{port}");
    // --kill-child: if the test dies, the namespace goes with it.
    let child = std::process::Command::new("unshare")
        .args(&flags)
        .arg("--kill-child")
        .arg(bin("sherlock"))
        .args(["-d", &directory, "--listen", &listen, "--admin", "off", "--run-dir", run_dir.to_str().unwrap()])
        .env("RUST_LOG", "info,dstack=debug")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let mut unshare = Spawned(child);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // It starts HAProxy (before the fix: "cannot start haproxy: Invalid
    // argument") and serves.
    let http = cluster.http.clone();
    eventually(Duration::from_secs(20), "sherlock as PID 1 to serve emitter", async || {
        (get_via(&http, port, "/emitter/").await.ok()?.0 == 200).then_some(())
    })
    .await;
    let pid1 = children_of(unshare.0.id() as i32);
    assert_eq!(pid1.len(), 1, "unshare has one child, the namespace's PID 1: {pid1:?}");
    let pid1 = pid1[0];

    // The master dies: its workers are orphaned to PID 1, which must reap
    // them; sherlock starts a new master.
    let haproxy = haproxy_pids(&run_dir);
    let master = *haproxy
        .iter()
        .find(|pid| proc_state(**pid).is_some_and(|(_, ppid)| !haproxy.contains(&ppid)))
        .unwrap_or_else(|| panic!("no master among {haproxy:?}"));
    let workers: Vec<i32> = children_of(master);
    assert!(!workers.is_empty(), "the master has workers");
    kill9(master);
    // A new HAProxy process, not only an answer: the orphaned worker may
    // serve on for a moment after its master's death.
    eventually(Duration::from_secs(20), "a new master to serve", async || {
        let serving = get_via(&http, port, "/emitter/").await.ok()?.0 == 200;
        let now = haproxy_pids(&run_dir);
        (serving && !now.contains(&master) && now.iter().any(|p| !haproxy.contains(p))).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "the orphaned workers to be reaped", async || {
        let left: Vec<(i32, Option<(char, i32)>)> =
            workers.iter().map(|w| (*w, proc_state(*w))).filter(|(_, s)| s.is_some()).collect();
        let zombies = children_of(pid1).into_iter().filter(|p| proc_state(*p).is_some_and(|(s, _)| s == 'Z')).count();
        (left.is_empty() && zombies == 0).then_some(())
    })
    .await;

    // SIGTERM to PID 1 reaches sherlock, which stops HAProxy and exits 0;
    // PID 1 exits with sherlock's status.
    // SAFETY: a plain kill(2) of the namespace's init, our grandchild.
    unsafe { libc::kill(pid1, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = unshare.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "PID 1 ignored SIGTERM for 15s; log:\n{}", log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}; log:\n{}", log_text());
    assert!(log_text().contains("haproxy stopped"), "{}", log_text());
    assert!(haproxy_pids(&run_dir).is_empty(), "no HAProxy left");
}

/// `GET /status` of a sherlock's admin endpoint.
async fn status_at(http: &reqwest::Client, admin: u16) -> Option<serde_json::Value> {
    http.get(format!("http://127.0.0.1:{admin}/status")).send().await.ok()?.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_leaves_the_running_config_serving_is_reported_and_retried() {
    // How the run dir's writes are made to fail. Root ignores mode bits, so
    // as root the run dir is a 1 MiB tmpfs in a mount namespace of
    // sherlock's own, filled up (ENOSPC); as another user it is made
    // read-only with chmod (EACCES).
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        let probe = std::process::Command::new("unshare").args(["--mount", "true"]).output();
        if !probe.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("SKIPPED: root here cannot make a mount namespace for the small run dir ({probe:?})");
            return;
        }
    }
    let cluster = Cluster::start().await;
    let (instances, _watsons) = cluster.fleet("emitter", &["v1"]).await;
    cluster.wait_for_instances("emitter", 1).await;
    let port = free_port();
    let admin = free_port();
    let run_dir = cluster.dir.path().join("small-run");
    std::fs::create_dir(&run_dir).unwrap();
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let log = cluster.dir.path().join("small-run-sherlock.log");
    let file = std::fs::File::create(&log).unwrap();
    let (directory, listen, admin_addr) =
        (cluster.directory_url(), format!("127.0.0.1:{port}"), format!("127.0.0.1:{admin}"));
    let sherlock_args =
        ["-d", &directory, "--listen", &listen, "--admin", &admin_addr, "--run-dir", run_dir.to_str().unwrap()];
    let mut command = if root {
        // Without --fork, unshare execs sh, which execs sherlock: one pid.
        let mut c = std::process::Command::new("unshare");
        c.args(["--mount", "sh", "-c", "mount -t tmpfs -o size=1m,mode=0700 dstack-test \"$0\" && exec \"$@\""])
            .arg(&run_dir)
            .arg(bin("sherlock"));
        c
    } else {
        std::process::Command::new(bin("sherlock"))
    };
    let child = command
        .args(sherlock_args)
        .env("RUST_LOG", "info,dstack=debug")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let sherlock = Spawned(child);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    // The run dir as sherlock sees it (through its mount namespace).
    let view = if root {
        PathBuf::from(format!("/proc/{}/root{}", sherlock.0.id(), run_dir.display()))
    } else {
        run_dir.clone()
    };
    let http = cluster.http.clone();
    eventually(Duration::from_secs(20), "the sherlock to serve emitter", async || {
        (get_via(&http, port, "/emitter/").await.ok()?.0 == 200).then_some(())
    })
    .await;
    let config_before = std::fs::read_to_string(view.join("haproxy.cfg")).unwrap();
    let snapshot_before = eventually(Duration::from_secs(10), "the snapshot saved", async || {
        std::fs::read_to_string(view.join("snapshot.json")).ok().filter(|s| s.contains(&instances[0].port.to_string()))
    })
    .await;

    // Writes fail from now on.
    let filler = view.join("filler");
    if root {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        assert!(f.write_all(&[0u8; 4096]).is_err(), "the tmpfs is full");
    } else {
        std::fs::set_permissions(&view, std::fs::Permissions::from_mode(0o500)).unwrap();
    }

    // A change comes: a second instance.
    let second = Instance::start("v1-second").await;
    let _second_watson = cluster.watson("emitter", &second.url("/emitter"), &[]);
    // The directory has it (this sherlock cannot apply it, so not
    // `wait_for_instances`).
    eventually(Duration::from_secs(15), "the directory to list two instances", async || {
        let status = cluster.status().await;
        (status["instances"].as_array()?.len() == 2).then_some(())
    })
    .await;
    let status = eventually(Duration::from_secs(15), "a failed write in /status", async || {
        let status = status_at(&http, admin).await?;
        status["last_error"].as_str()?.contains("cannot write").then_some(status)
    })
    .await;
    let reason = if root { "No space left on device" } else { "Permission denied" };
    assert!(status["last_error"].as_str().unwrap().contains(reason), "{status}");
    let metrics = http.get(format!("http://127.0.0.1:{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metric(&metrics, "dstack_sherlock_failed_writes_total") >= 1, "{metrics}");
    assert!(log_text().contains("cannot write"), "the log says so");

    // Nothing half-applied: HAProxy still runs the old config, whole, and
    // the files are the old ones, with no temp file left behind.
    let mut answered = std::collections::HashMap::<String, usize>::new();
    for _ in 0..20 {
        let (code, body) = get_via(&http, port, "/emitter/").await.unwrap();
        assert_eq!(code, 200, "{body}");
        *answered.entry(body.split(' ').next().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(answered.keys().collect::<Vec<_>>(), [&instances[0].name], "only the old server serves: {answered:?}");
    assert_eq!(std::fs::read_to_string(view.join("haproxy.cfg")).unwrap(), config_before);
    assert_eq!(std::fs::read_to_string(view.join("snapshot.json")).unwrap(), snapshot_before);
    let names: Vec<String> =
        std::fs::read_dir(&view).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp") || n.ends_with(".candidate")), "{names:?}");

    // The disk has room again: a later pass applies the change.
    if root {
        std::fs::remove_file(&filler).unwrap();
    } else {
        std::fs::set_permissions(&view, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    eventually(Duration::from_secs(40), "both instances served after the retry", async || {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10 {
            seen.insert(get_via(&http, port, "/emitter/").await.ok()?.1.split(' ').next()?.to_string());
        }
        (seen.len() == 2).then_some(())
    })
    .await;
    let status = status_at(&http, admin).await.unwrap();
    assert_eq!(status["last_error"], serde_json::Value::Null, "{status}");
    let saved = std::fs::read_to_string(view.join("snapshot.json")).unwrap();
    assert!(saved.contains(&second.port.to_string()), "the snapshot is saved once the disk has room: {saved}");
    drop(sherlock);
}

/// An HTTP instance in a process of its own (so it can be stopped with
/// SIGSTOP, its port left open): an HAProxy that answers every request
/// with `NAME`.
fn haproxy_instance(dir: &Path, name: &str) -> (u16, Spawned) {
    let port = free_port();
    let config = dir.join(format!("{name}.cfg"));
    let text = format!(
        "defaults\n    mode http\n    timeout client 60s\n    timeout connect 1s\n    timeout server 1s\n\
         frontend {name}\n    bind 127.0.0.1:{port}\n    http-request return status 200 content-type text/plain string {name}\n"
    );
    std::fs::write(&config, text).unwrap();
    let child = std::process::Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (port, Spawned(child))
}

/// `srv_op_state` (2 running, 0 down) of the server at `port` in `backend`,
/// from `show servers state` on sherlock's admin socket; None when HAProxy
/// no longer has it.
fn op_state(run_dir: &Path, backend: &str, port: u16) -> Option<u32> {
    let text = socket_command(&run_dir.join("admin.sock"), &format!("show servers state {backend}"));
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 18 && f[18] == port.to_string()).then(|| f[5].parse().ok()).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_instance_is_taken_out_and_holds_no_request_for_long() {
    let cluster = Cluster::start().await;
    let (sick_port, sick) = haproxy_instance(cluster.dir.path(), "sick");
    let (well_port, _well) = haproxy_instance(cluster.dir.path(), "well");
    let _watsons: Vec<Proc> = [sick_port, well_port]
        .iter()
        .map(|port| cluster.watson("emitter", &format!("http://127.0.0.1:{port}/emitter"), &[]))
        .collect();
    cluster.wait_for_instances("emitter", 2).await;
    let run_dir = cluster.run_dir(cluster.sherlock_port);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(40)).pool_max_idle_per_host(0).build().unwrap();
    let url = format!("http://127.0.0.1:{}/emitter/", cluster.sherlock_port);
    let (counts, errors) = cluster.tally("/emitter/", 10).await;
    assert_eq!((counts.len(), errors), (2, 0), "both serve before: {counts:?}");

    // It hangs: SIGSTOP, its port still open (the kernel still accepts).
    let stopped = Instant::now();
    // SAFETY: stopping our own child.
    unsafe { libc::kill(sick.0.id() as i32, libc::SIGSTOP) };
    // A request every 100 ms for 12 s, each on its own task, so a hung one
    // does not hold the trickle back: (sent at, took, answer or error).
    let mut requests = Vec::new();
    let mut out_at = None;
    while stopped.elapsed() < Duration::from_secs(12) {
        let (http, url) = (http.clone(), url.clone());
        requests.push(tokio::spawn(async move {
            let sent = stopped.elapsed();
            let answer = match http.get(&url).send().await {
                Ok(resp) if resp.status() == 200 => resp.text().await.map_err(|e| e.to_string()),
                Ok(resp) => Err(format!("status {}", resp.status())),
                Err(e) => Err(e.to_string()),
            };
            (sent, stopped.elapsed() - sent, answer)
        }));
        if out_at.is_none() && op_state(&run_dir, "svc_emitter", sick_port).is_none_or(|s| s != 2) {
            out_at = Some(stopped.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut results = Vec::new();
    for r in requests {
        results.push(r.await.unwrap());
    }
    // SAFETY: resuming our own child, so it can be killed and reaped.
    unsafe { libc::kill(sick.0.id() as i32, libc::SIGCONT) };

    let out_at = out_at.expect("the hung instance taken out of HAProxy within 12 s");
    let longest = results.iter().map(|(_, took, _)| *took).max().unwrap();
    let failed: Vec<_> = results.iter().filter(|(_, _, a)| a.is_err()).collect();
    println!(
        "hung instance out of HAProxy after {out_at:?}; {} requests, {} failed, the longest took {longest:?}",
        results.len(),
        failed.len()
    );
    assert!(out_at < Duration::from_secs(10), "taken out after {out_at:?}");
    assert!(longest < Duration::from_secs(15), "a request waited {longest:?} (HAProxy's server timeout is 60 s)");
    // Only requests sent before it was out may have failed (those that went
    // to it); every later one is answered by the healthy instance.
    for (sent, took, answer) in &results {
        if *sent > out_at {
            assert_eq!(answer.as_deref(), Ok("well"), "sent at {sent:?}, took {took:?}");
        }
    }
    assert!(failed.iter().all(|(sent, _, _)| *sent <= out_at), "{failed:?}");
}

/// (`srv_op_state`, weight) of the server at `port` in `backend`.
fn op_and_weight(run_dir: &Path, backend: &str, port: u16) -> Option<(u32, u32)> {
    let text = socket_command(&run_dir.join("admin.sock"), &format!("show servers state {backend}"));
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 18 && f[18] == port.to_string()).then(|| Some((f[5].parse().ok()?, f[7].parse().ok()?))).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_haproxy_has_down_hands_its_weight_to_its_versions_servers_up() {
    let cluster = Cluster::start().await;
    // Watson checks elsewhere, so the directory lists a dead instance on:
    // what a dead host looks like until its TTL runs out.
    let health = Instance::start("health").await;
    let check = health.url("/status/liveness_check");
    let mut a = Instance::start("v1-a").await;
    let b = Instance::start("v1-b").await;
    let c = Instance::start("v2-c").await;
    let _watsons: Vec<Proc> = [(&a, "v1"), (&b, "v1"), (&c, "v2")]
        .iter()
        .map(|(i, v)| cluster.watson("emitter", &i.url("/emitter"), &["--version", v, "--check-url", &check]))
        .collect();
    cluster.wait_for_instances("emitter", 3).await;
    let run_dir = cluster.run_dir(cluster.sherlock_port);
    let state = |port| op_and_weight(&run_dir, "svc_emitter", port).expect("the server in HAProxy");
    let (b_before, c_before) = (state(b.port).1, state(c.port).1);
    assert_eq!(state(a.port).1, b_before, "v1's share split over a and b");

    a.kill().await;
    let b_after = eventually(Duration::from_secs(15), "b to carry v1's whole share", async || {
        let (a_op, _) = state(a.port);
        let (_, b_weight) = state(b.port);
        (a_op == 0 && b_weight != b_before).then_some(b_weight)
    })
    .await;
    assert_eq!(b_after, 2 * b_before, "v1's whole weight on b");
    assert_eq!(state(c.port).1, c_before, "v2 as it was");
    assert_eq!(cluster.status().await["instances"].as_array().unwrap().len(), 3, "the directory still lists a");
}
