//! `dw` honours the operator's git setup as `git commit` does: hooks
//! (pre-commit, commit-msg, pre-push) and commit signing. Real repos, the
//! real `git`, the real `dw`, and a directory following the remote.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use common::*;

const BARKER: &str = "barker:\n  v1: 100\n";
const CANARY: &str = "barker:\n  v1: 90\n  v2: 10\n";

/// A remote with one routes commit, its clone, and a directory following it
/// (no sherlock: these tests stop at the push).
struct Setup {
    repo: RoutesRepo,
    directory: Cluster,
    _tmp: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Setup {
        let tmp = tempfile::Builder::new().prefix("dstack-dwgit").tempdir().unwrap();
        let repo = RoutesRepo::new(tmp.path());
        repo.commit(&[("routes/barker.yaml", BARKER)], "initial routes");
        let directory = Cluster::directory_alone(&["--repo", &repo.url(), "--poll", "1h"]).await;
        Setup { repo, directory, _tmp: tmp }
    }

    fn hook(&self, name: &str, script: &str) {
        let path = self.repo.work.join(".git/hooks").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git").arg("-C").arg(&self.repo.work).args(args).output().unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn remote_head(&self) -> git2::Oid {
        git2::Repository::open_bare(&self.repo.remote).unwrap().refname_to_id("refs/heads/main").unwrap()
    }

    /// `dw apply` of the canary, in the clone, with a short convergence wait.
    fn apply_canary(&self) -> (i32, String, String) {
        std::fs::write(self.repo.work.join("routes/barker.yaml"), CANARY).unwrap();
        self.directory.dw_in(&self.repo.work, &["apply", "--timeout", "1s", "-m", "barker: canary"])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pre_commit_hook_stops_apply_before_anything_is_committed() {
    let s = Setup::start().await;
    let before = s.remote_head();
    s.hook("pre-commit", "echo 'routes are frozen for the release' >&2; exit 1");
    let (code, _, stderr) = s.apply_canary();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("routes are frozen for the release"), "the hook's words reach the operator: {stderr}");
    assert_eq!(s.remote_head(), before, "nothing was pushed");
    assert_eq!(s.git(&["rev-list", "--count", "HEAD"]).trim(), "1", "nothing was committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_msg_and_pre_push_hooks_run() {
    let s = Setup::start().await;
    s.hook("commit-msg", "printf '\\nChange-Id: I0123456789\\n' >> \"$1\"");
    s.hook("pre-push", "echo 'pushes need review' >&2; exit 1");
    let before = s.remote_head();
    let (code, _, stderr) = s.apply_canary();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("pushes need review"), "{stderr}");
    assert_eq!(s.remote_head(), before, "the pre-push hook stopped the push");
    let message = s.git(&["log", "-1", "--format=%B"]);
    assert!(message.starts_with("barker: canary"), "{message}");
    assert!(message.contains("Change-Id: I0123456789"), "the commit-msg hook ran: {message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_and_rollback_sign_with_the_users_ssh_key() {
    let s = Setup::start().await;
    let key = s.repo.work.parent().unwrap().join("signing_key");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "ops@example.com", "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen (openssh-client) is installed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    s.git(&["config", "gpg.format", "ssh"]);
    s.git(&["config", "user.signingkey", key.to_str().unwrap()]);
    s.git(&["config", "commit.gpgsign", "true"]);

    let (code, _, stderr) = s.apply_canary();
    // No sherlock follows: the wait times out, after the signed push.
    assert_eq!(code, 1, "{stderr}");
    let pushed = s.remote_head();
    let remote = git2::Repository::open_bare(&s.repo.remote).unwrap();
    let (signature, _) = remote.extract_signature(&pushed, None).expect("the apply commit is signed");
    assert!(signature.as_str().unwrap().contains("BEGIN SSH SIGNATURE"), "{:?}", signature.as_str());

    let (code, _, stderr) = s.directory.dw_in(&s.repo.work, &["rollback", "--timeout", "1s"]);
    assert_eq!(code, 1, "{stderr}");
    let reverted = s.remote_head();
    assert_ne!(reverted, pushed, "the revert was pushed: {stderr}");
    let remote = git2::Repository::open_bare(&s.repo.remote).unwrap();
    assert!(remote.extract_signature(&reverted, None).is_ok(), "the revert commit is signed");
    assert_eq!(std::fs::read_to_string(s.repo.work.join("routes/barker.yaml")).unwrap(), BARKER);
}
