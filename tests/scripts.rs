//! The scripts behind `make test` and `make demo`.

use std::path::Path;
use std::process::Command;

/// Runs `scripts/install-deps.sh` with a fake `haproxy` that reports
/// `banner`, and fake `git` and `curl`, so nothing is ever installed.
fn install_deps_with(banner: &str) -> (i32, String) {
    let bin = tempfile::tempdir().unwrap();
    let fake = |name: &str, script: &str| {
        let path = bin.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).unwrap();
    };
    fake("haproxy", &format!("echo '{banner}'\necho 'Status: long-term supported branch'"));
    fake("git", "exit 0");
    fake("curl", "exit 0");
    // The fakes first, then only the system's own tools (sed, head).
    let path = format!("{}:/usr/bin:/bin", bin.path().display());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-deps.sh");
    let out = Command::new("bash").arg(script).env("PATH", path).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn install_deps_refuses_an_haproxy_older_than_2_6() {
    for (banner, old) in [
        ("HA-Proxy version 1.8.19 2019/02/11 - https://haproxy.org/", "1.8"),
        ("HAProxy version 2.4.22-0ubuntu0.22.04.3 2023/08/14 - https://haproxy.org/", "2.4"),
    ] {
        let (code, stderr) = install_deps_with(banner);
        assert_eq!(code, 1, "{banner}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
        assert!(
            stderr.contains(&format!("HAProxy {old} found")) && stderr.contains("needs HAProxy 2.6 or newer"),
            "{stderr}"
        );
    }
    let (code, stderr) = install_deps_with("not a version banner");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot read HAProxy's version"), "{stderr}");
    for banner in ["HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/", "HAProxy version 3.0.5-1 2024"]
    {
        let (code, stderr) = install_deps_with(banner);
        assert_eq!((code, stderr.as_str()), (0, ""), "{banner}");
    }
}

/// Ends a process group when dropped, so a failing test leaves nothing.
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: signalling the process group this test started.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

/// The live processes (not zombies) in process group `pgid`, or whose
/// command line names `dir`: what a stopped demo must not leave behind.
fn processes_of(pgid: i32, dir: &Path) -> Vec<String> {
    let needle = dir.to_str().unwrap();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // After "(comm)": state, ppid, pgrp.
        let Some((_, rest)) = stat.rsplit_once(") ") else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) || cmdline.contains(needle) {
            found.push(format!("{pid}: {}", cmdline.trim()));
        }
    }
    found
}

/// Regression (issue 10): Ctrl-C during `make demo`'s start-up took 11 s,
/// because the trap cleaned up and returned into the start-up wait loop.
/// The terminal sends SIGINT to the whole foreground process group, so
/// this test does too, then checks how long the stop takes and that no
/// process of the demo is left.
#[test]
fn ctrl_c_during_the_demos_start_up_stops_everything_at_once() {
    use std::os::unix::process::CommandExt as _;
    use std::time::{Duration, Instant};
    let tmp = tempfile::Builder::new().prefix("dstack-demo-test").tempdir().unwrap();
    let state = tmp.path().join("demo");
    // The examples are not built by `cargo test`: stand-ins that only wait
    // are enough, and a leftover one would show like any other process.
    let examples = tmp.path().join("examples");
    std::fs::create_dir(&examples).unwrap();
    for name in ["emitter", "transform"] {
        let path = examples.join(name);
        std::fs::write(&path, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_directory")).parent().unwrap();
    let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let ports = |n: usize| (0..n).map(|_| port()).collect::<Vec<_>>().join(" ");
    let out = std::fs::File::create(tmp.path().join("demo.out")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo.sh");
    let mut child = Command::new("bash")
        .arg(script)
        .env("DSTACK_BIN", bin)
        .env("DSTACK_EXAMPLES", &examples)
        .env("DEMO_STATE", &state)
        .env("DIRECTORY_PORT", port())
        .env("SHERLOCK_PORT", port())
        .env("ADMIN_PORT", port())
        .env("TRANSFORM_PORT", port())
        .env("EMITTER_PORTS", ports(3))
        .env("BARKER_PORTS", ports(4))
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        // Its own process group, as a terminal's foreground job.
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    let _group = Group(pgid);
    let output = || std::fs::read_to_string(tmp.path().join("demo.out")).unwrap_or_default();

    // The last process started before the wait loop: the loop runs now,
    // with every process up (no emitter ever passes its check, so it would
    // run for its whole 10 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !state.join("logs/watson-transform.log").exists() {
        assert!(child.try_wait().unwrap().is_none(), "the demo ended early:\n{}", output());
        assert!(Instant::now() < deadline, "the demo did not start its processes:\n{}", output());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let running = processes_of(pgid, tmp.path());
    assert!(running.len() > 10, "the demo's processes run: {running:#?}");

    let sent = Instant::now();
    // SAFETY: signalling the process group this test started.
    unsafe { libc::kill(-pgid, libc::SIGINT) };
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(sent.elapsed() < Duration::from_secs(30), "the demo ignored Ctrl-C:\n{}", output());
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = sent.elapsed();
    // About a second, also with three busy loops on the machine's two
    // cores; 10 s before sherlock let a signal cut short a reload's wait
    // for a worker (the signal had reached HAProxy too), 11 s before the
    // script exited from its trap.
    assert!(took < Duration::from_secs(6), "Ctrl-C took {took:?} to stop the demo:\n{}", output());
    assert_eq!(status.code(), Some(130), "exit status {status:?}:\n{}", output());
    assert!(!output().contains("dstack is running"), "the demo went on after Ctrl-C:\n{}", output());
    let left = processes_of(pgid, tmp.path());
    assert!(left.is_empty(), "left behind after Ctrl-C: {left:#?}\n{}", output());
}
