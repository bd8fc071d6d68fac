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

    // The master dies: its workers follow it, and the port is served
    // again at once by a new master. Requests go back to back meanwhile;
    // the outage is the longest run of failed ones.
    let http = cluster.http.clone();
    let old_master = master_pid(&run_dir);
    kill9(old_master);
    let killed = Instant::now();
    let (mut outage, mut failing_since) = (Duration::ZERO, None::<Instant>);
    loop {
        let sent = Instant::now();
        match get_via(&cluster.http, port, "/emitter/").await {
            Ok((200, _)) => {
                if let Some(since) = failing_since.take() {
                    outage = outage.max(since.elapsed());
                }
                let new_master = try_socket_command(&run_dir.join("master.sock"), "show proc").ok().and_then(|t| {
                    t.lines().find_map(|l| l.split_whitespace().next()?.parse::<i32>().ok().filter(|p| *p != old_master))
                });
                if new_master.is_some() {
                    break;
                }
            }
            _ => {
                failing_since.get_or_insert(sent);
            }
        }
        assert!(killed.elapsed() < Duration::from_secs(20), "no new master serving 20s after the kill");
    }
    println!("a SIGKILL of haproxy's master: port not served for {outage:?}");
    assert!(outage < Duration::from_secs(5), "{outage:?} without service (the goal is under a second)");
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
