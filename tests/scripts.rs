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
