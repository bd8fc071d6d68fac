//! `dw`, end to end: a bare remote and a clone made with git2, a directory
//! pulling the remote, watsons, a sherlock and its HAProxy, and the real `dw`
//! binary editing, planning, applying and rolling back in the clone.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The first commit's barker route: a comment the edits must keep.
const BARKER: &str = "# the barker canary\nbarker:\n  v1: 100\n";
/// Another service's file, which no barker edit may touch.
const EMITTER: &str = "# the pipeline's source\nemitter: {v1: 100}  # one version for now\n";
/// A file outside routes/, which dw must leave to the operator.
const README: &str = "The routes of the dstack demo.\n";
const CANARY: &str = "# the barker canary\nbarker:\n  v1: 90\n  v2: 10\n";

/// A routes repo whose first commit holds barker and emitter, a cluster
/// following it, and barker instances named `<version>-<n>` with watsons.
struct Setup {
    repo: RoutesRepo,
    initial: git2::Oid,
    cluster: Cluster,
    instances: Vec<Instance>,
    _watsons: Vec<Proc>,
    /// Holds the repo; dropped last.
    _tmp: tempfile::TempDir,
}

impl Setup {
    async fn start(versions: &[&str]) -> Setup {
        let tmp = tempfile::Builder::new().prefix("dstack-dw").tempdir().unwrap();
        let repo = RoutesRepo::new(tmp.path());
        let files = [("routes/barker.yaml", BARKER), ("routes/emitter.yaml", EMITTER), ("README.md", README)];
        let initial = repo.commit(&files, "initial routes");
        let url = repo.url();
        let cluster = Cluster::start_with(&["--repo", &url, "--poll", "1h"]).await;
        let (instances, watsons) = cluster.fleet("barker", versions).await;
        if !versions.is_empty() {
            cluster.wait_for_instances("barker", versions.len()).await;
        }
        cluster.wait_for_commit(initial).await;
        // The end of warming publishes a snapshot; the tests check that
        // plan publishes none.
        cluster.wait_until_warm().await;
        Setup { repo, initial, cluster, instances, _watsons: watsons, _tmp: tmp }
    }

    /// Runs dw in the clone against this cluster's directory.
    fn dw(&self, args: &[&str]) -> (i32, String, String) {
        self.cluster.dw_in(&self.repo.work, args)
    }

    fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.repo.work.join(path)).unwrap()
    }

    /// Where the remote's main branch points.
    fn remote_head(&self) -> git2::Oid {
        git2::Repository::open_bare(&self.repo.remote).unwrap().refname_to_id("refs/heads/main").unwrap()
    }

    fn remote_message(&self) -> String {
        let remote = git2::Repository::open_bare(&self.repo.remote).unwrap();
        let commit = remote.find_commit(self.remote_head()).unwrap();
        commit.message().unwrap().to_string()
    }

    fn local_head(&self) -> git2::Oid {
        self.repo.repo.head().unwrap().peel_to_commit().unwrap().id()
    }

    fn sherlock_config(&self) -> String {
        let path = self.cluster.dir.path().join(format!("sherlock-{}", self.cluster.sherlock_port)).join("haproxy.cfg");
        std::fs::read_to_string(path).unwrap()
    }

    async fn reconcile(&self) -> serde_json::Value {
        self.cluster.reconcile().await
    }
}

fn short(oid: git2::Oid) -> String {
    oid.to_string()[..10].to_string()
}

/// Asserts a dw run's exit code, showing its output when it differs.
fn expect(code: i32, run: &(i32, String, String)) {
    assert_eq!(run.0, code, "dw exited {}\nstdout:\n{}\nstderr:\n{}", run.0, run.1, run.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_set_plan_apply_and_rollback_move_live_traffic() {
    let s = Setup::start(&["v1", "v1", "v2"]).await;
    let (counts, errors) = s.cluster.tally("/barker/", 30).await;
    assert_eq!((by_version(&counts).get("v1"), errors), (Some(&30), 0), "{counts:?}");

    // route set edits the working tree only, keeping the comment line.
    let run = s.dw(&["route", "set", "barker", "v1=90", "v2=10"]);
    expect(0, &run);
    assert!(run.1.contains("routes/barker.yaml"), "{}", run.1);
    assert_eq!(s.read("routes/barker.yaml"), CANARY);
    assert_eq!(s.read("routes/emitter.yaml"), EMITTER);
    assert_eq!(s.local_head(), s.initial, "route set commits nothing");

    // plan: exit 2, the barker change, the traffic table and the cfg diff.
    let before_status = s.cluster.status().await;
    let before_cfg = s.sherlock_config();
    let run = s.dw(&["plan", "--detailed-exitcode"]);
    expect(2, &run);
    let out = &run.1;
    assert!(out.contains("~ barker"), "{out}");
    assert!(out.contains("~ v1: 100 -> 90"), "{out}");
    assert!(out.contains("+ v2: 10"), "{out}");
    let route_changes = out.split("Traffic").next().unwrap();
    assert!(!route_changes.contains("emitter"), "emitter did not change: {out}");
    assert!(out.contains("Traffic"), "{out}");
    let v2_row = out.lines().find(|l| l.contains("barker") && l.contains("v2") && l.contains("(all)"));
    let v2_row = v2_row.unwrap_or_else(|| panic!("no v2 row in the traffic table:\n{out}"));
    assert!(v2_row.contains("0.0% ->") && v2_row.contains("10.0%"), "{v2_row}");
    let v1_row = out.lines().find(|l| l.contains("barker") && l.contains(" v1 ") && l.contains("(all)")).unwrap();
    assert!(v1_row.contains("100.0% ->") && v1_row.contains("90.0%"), "{v1_row}");
    // One row per live instance, under its version.
    for instance in &s.instances {
        assert!(out.contains(&format!("127.0.0.1:{}", instance.port)), "no row for {}:\n{out}", instance.name);
    }
    assert!(out.contains("haproxy.cfg"), "{out}");
    let weight_line = |sign: &str| out.lines().any(|l| l.trim_start().starts_with(sign) && l.contains(" weight "));
    assert!(weight_line("-    server") && weight_line("+    server"), "no +/- weight lines:\n{out}");
    assert!(out.contains("Plan: 0 to add, 1 to change, 0 to remove (barker)"), "{out}");
    assert!(out.contains(&short(s.initial)), "the summary names the commit served: {out}");

    // ...and changes nothing live.
    let after_status = s.cluster.status().await;
    assert_eq!(after_status["commit"], before_status["commit"]);
    assert_eq!(after_status["index"], before_status["index"]);
    assert_eq!(s.sherlock_config(), before_cfg);
    assert_eq!(s.remote_head(), s.initial);
    let (counts, _) = s.cluster.tally("/barker/", 30).await;
    assert_eq!(by_version(&counts).get("v1"), Some(&30), "{counts:?}");

    // apply: commit, push, and return once every sherlock has it.
    let run = s.dw(&["apply", "-m", "barker: canary v2 at 10%"]);
    expect(0, &run);
    assert!(run.1.contains("Pushed to origin/main"), "{}", run.1);
    let applied = s.local_head();
    assert_ne!(applied, s.initial);
    assert_eq!(s.remote_head(), applied);
    assert_eq!(s.remote_message().trim_end(), "barker: canary v2 at 10%", "git ends a message with a newline");
    assert!(run.1.contains(&short(applied)), "{}", run.1);
    let (counts, errors) = s.cluster.tally("/barker/", 500).await;
    let versions = by_version(&counts);
    let v2 = *versions.get("v2").unwrap_or(&0);
    assert_eq!(errors, 0, "{counts:?}");
    assert!((35..=65).contains(&v2), "v2 got {v2} of 500 right after apply returned, not 10% +-3: {versions:?}");
    assert_eq!(s.cluster.status().await["commit"], applied.to_string());

    // plan again: nothing left to do.
    let run = s.dw(&["plan", "--detailed-exitcode"]);
    expect(0, &run);
    assert!(run.1.contains("No changes"), "{}", run.1);

    // rollback: a real `Revert "..."` commit, pushed; v2 gets nothing at once.
    // The operator's uncommitted work outside routes/ survives it.
    let notes = "The routes of the dstack demo.\nAn uncommitted note.\n";
    std::fs::write(s.repo.work.join("README.md"), notes).unwrap();
    let run = s.dw(&["rollback"]);
    expect(0, &run);
    let reverted = s.remote_head();
    assert_eq!(s.local_head(), reverted);
    let message = s.remote_message();
    assert!(message.starts_with("Revert \"barker: canary v2 at 10%\""), "{message}");
    assert!(message.contains(&format!("This reverts commit {applied}.")), "{message}");
    let (counts, errors) = s.cluster.tally("/barker/", 100).await;
    assert_eq!((by_version(&counts).get("v1"), errors), (Some(&100), 0), "v2 must get nothing: {counts:?}");
    assert_eq!(s.read("routes/barker.yaml"), BARKER, "the working tree follows the revert");
    assert_eq!(s.read("README.md"), notes, "rollback kept the uncommitted edit");
    let statuses = s.repo.repo.statuses(None).unwrap();
    let changed: Vec<(String, git2::Status)> =
        statuses.iter().map(|e| (e.path().unwrap().to_string(), e.status())).collect();
    assert_eq!(changed, [("README.md".to_string(), git2::Status::WT_MODIFIED)], "index and tree match the revert");
    let run = s.dw(&["plan", "--detailed-exitcode"]);
    expect(0, &run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_plan_is_applied_while_fresh_and_refused_once_stale() {
    let s = Setup::start(&["v1", "v2"]).await;
    expect(0, &s.dw(&["route", "set", "barker", "v1=50", "v2=50"]));
    let plan_file = s.repo.work.parent().unwrap().join("canary.plan");
    let plan_arg = plan_file.to_str().unwrap();

    // --json prints the same plan.
    let run = s.dw(&["plan", "--json"]);
    expect(0, &run);
    let plan: serde_json::Value = serde_json::from_str(&run.1).unwrap();
    assert_eq!(plan["changes"][0]["service"], "barker", "{plan}");
    assert_eq!(plan["changes"][0]["kind"], "changed", "{plan}");
    assert_eq!(plan["served_commit"], s.initial.to_string());
    let v2 = plan["traffic"].as_array().unwrap().iter().find(|r| r["version"] == "v2" && r["instance"].is_null());
    assert_eq!(v2.map(|r| (r["now"].as_f64(), r["after"].as_f64())), Some((Some(0.0), Some(50.0))), "{plan}");
    assert!(plan["haproxy_diff"].as_str().unwrap().contains(" weight "), "{plan}");

    // A plan saved, then the routes edited again: stale.
    expect(0, &s.dw(&["plan", "--out", plan_arg]));
    expect(0, &s.dw(&["route", "set", "barker", "v1=20", "v2=80"]));
    let run = s.dw(&["apply", plan_arg]);
    expect(1, &run);
    assert!(run.2.contains("stale") && run.2.contains("routes files changed"), "{}", run.2);
    assert_eq!(s.remote_head(), s.initial, "nothing pushed");
    assert_eq!(s.local_head(), s.initial, "nothing committed");

    // A plan saved, then the directory moved to another commit: stale too.
    expect(0, &s.dw(&["plan", "--out", plan_arg]));
    let elsewhere = git2::Repository::clone(&s.repo.url(), s.repo.work.parent().unwrap().join("other")).unwrap();
    let other = commit_in(&elsewhere, "routes/emitter.yaml", "emitter: {v1: 100}\n", "emitter: tidy");
    s.reconcile().await;
    s.cluster.wait_for_commit(other).await;
    let run = s.dw(&["apply", plan_arg]);
    expect(1, &run);
    assert!(run.2.contains("stale") && run.2.contains(&short(other)), "{}", run.2);
    assert_eq!(s.remote_head(), other, "nothing pushed");

    // Pulled, edited again and planned afresh, it is applied.
    s.repo.repo.find_remote("origin").unwrap().fetch(&["main"], None, None).unwrap();
    let fetched = s.repo.repo.find_reference("FETCH_HEAD").unwrap().peel_to_commit().unwrap();
    s.repo.repo.reset(fetched.as_object(), git2::ResetType::Hard, None).unwrap();
    expect(0, &s.dw(&["route", "set", "barker", "v1=20", "v2=80"]));
    expect(0, &s.dw(&["plan", "--out", plan_arg]));
    let run = s.dw(&["apply", plan_arg]);
    expect(0, &run);
    assert_eq!(s.remote_head(), s.local_head());
    let status = s.cluster.status().await;
    assert_eq!(status["commit"], s.local_head().to_string());
    assert_eq!(status["desired"]["routes"]["barker"]["weights"]["v2"], 80, "{status}");
}

/// Writes one file in a clone, commits it and pushes it to origin/main.
fn commit_in(repo: &git2::Repository, path: &str, text: &str, message: &str) -> git2::Oid {
    let full = repo.workdir().unwrap().join(path);
    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
    std::fs::write(full, text).unwrap();
    let mut index = repo.index().unwrap();
    index.add_path(Path::new(path)).unwrap();
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("other operator", "other@dstack.invalid").unwrap();
    let head = repo.head().unwrap().peel_to_commit().unwrap();
    let oid = repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &[&head]).unwrap();
    repo.find_remote("origin").unwrap().push(&["refs/heads/main:refs/heads/main"], None).unwrap();
    oid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_refuses_to_push_when_the_remote_has_moved() {
    let s = Setup::start(&["v1"]).await;
    let elsewhere = git2::Repository::clone(&s.repo.url(), s.repo.work.parent().unwrap().join("other")).unwrap();
    let other = commit_in(&elsewhere, "routes/emitter.yaml", "emitter: {v1: 100}\n", "emitter: tidy");

    expect(0, &s.dw(&["route", "set", "barker", "v1=90", "v2=10"]));
    let run = s.dw(&["apply", "-m", "barker canary"]);
    expect(1, &run);
    assert!(run.2.contains("pull"), "{}", run.2);
    assert!(run.2.contains(&short(other)), "names where origin is: {}", run.2);
    assert_eq!(s.remote_head(), other, "the other operator's commit stays");
    assert_eq!(s.local_head(), s.initial, "nothing committed");
    assert_eq!(s.read("routes/barker.yaml"), CANARY, "the edit is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_yaml_makes_plan_exit_1_naming_file_and_line() {
    let s = Setup::start(&[]).await;
    std::fs::write(s.repo.work.join("routes/barker.yaml"), "# the barker canary\nbarker:\n  v1: 90\n  v2: [10\n")
        .unwrap();
    let run = s.dw(&["plan", "--detailed-exitcode"]);
    expect(1, &run);
    assert!(run.2.contains("routes/barker.yaml:5:"), "names the file and line: {}", run.2);
    // Valid YAML whose weights break the rules is an error too, located.
    std::fs::write(s.repo.work.join("routes/barker.yaml"), "# the barker canary\nbarker:\n  v1: 90\n  v2: 20\n")
        .unwrap();
    let run = s.dw(&["plan", "--detailed-exitcode"]);
    expect(1, &run);
    assert!(run.2.contains("routes/barker.yaml:3:") && run.2.contains("110"), "{}", run.2);
    let run = s.dw(&["apply"]);
    expect(1, &run);
    assert_eq!(s.remote_head(), s.initial, "nothing pushed");
}

#[test]
fn route_set_refuses_bad_weights_and_leaves_the_file_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    repo.commit(&[("routes/barker.yaml", BARKER), ("routes/emitter.yaml", EMITTER)], "initial routes");
    // No directory is needed to edit; this one is never called (so it stays plain in secure mode).
    let dw = |args: &[&str]| run_dw(&[&["-d", "127.0.0.1:1"], args].concat(), Some(&repo.work));
    let barker = repo.work.join("routes/barker.yaml");
    let mtime = || std::fs::metadata(&barker).unwrap().modified().unwrap();
    let before = mtime();

    let cases: [(&[&str], &str); 6] = [
        (&["barker", "v1=100", "v2=10"], "must sum to 100"),
        (&["barker", "v1=90"], "must sum to 100"),
        (&["barker", "v 1=100"], "invalid version"),
        (&["barker", "v1=ninety", "v2=10"], "whole number from 0 to 100"),
        (&["barker", "v1=50", "v1=50"], "given twice"),
        (&["Barker", "v1=100"], "Barker"),
    ];
    for (args, rule) in cases {
        let run = dw(&[&["route", "set"], args].concat());
        assert_eq!(run.0, 1, "{args:?}: {run:?}");
        assert!(run.2.contains(rule), "{args:?}: the message states the rule ({rule}): {}", run.2);
        assert_eq!(std::fs::read_to_string(&barker).unwrap(), BARKER, "{args:?}");
    }
    assert_eq!(mtime(), before, "the file was not rewritten");
    assert_eq!(std::fs::read_to_string(repo.work.join("routes/emitter.yaml")).unwrap(), EMITTER);
    let leftovers: Vec<PathBuf> =
        std::fs::read_dir(repo.work.join("routes")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(leftovers.len(), 2, "no temp files left: {leftovers:?}");
}

#[test]
fn route_add_in_the_dstack_form_scales_the_other_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    repo.commit(&[("routes/barker.yaml", BARKER), ("routes/emitter.yaml", EMITTER)], "initial routes");
    // Editing needs no directory: this one is never called, so it stays plain in secure mode.
    let dw = |args: &[&str]| run_dw(&[&["-d", "127.0.0.1:1"], args].concat(), Some(&repo.work));
    let read = || std::fs::read_to_string(repo.work.join("routes/barker.yaml")).unwrap();

    expect(0, &dw(&["route", "add", "//barker", "//barker(v2)", "10%"]));
    assert_eq!(read(), CANARY, "90/10 from v1: 100, comment kept");
    // Plain names, and version 2 of the original form.
    expect(0, &dw(&["route", "add", "barker", "barker(2)", "20"]));
    assert_eq!(read(), "# the barker canary\nbarker:\n  v1: 72\n  v2: 8\n  2: 20\n");
    // A client's own share: the service's split stays for everyone else.
    expect(0, &dw(&["route", "set", "barker", "v1=90", "v2=10"]));
    expect(0, &dw(&["route", "add", "//monolith", "//barker(v2)", "30%"]));
    assert_eq!(
        read(),
        "# the barker canary\nbarker:\n  weights:\n    v1: 90\n    v2: 10\n  clients:\n    monolith: {v1: 70, v2: 30}\n"
    );
    assert_eq!(std::fs::read_to_string(repo.work.join("routes/emitter.yaml")).unwrap(), EMITTER);

    let run = dw(&["route", "add", "//barker", "//barker(v2)", "110%"]);
    expect(1, &run);
    assert!(run.2.contains("from 0 to 100"), "{}", run.2);
    let run = dw(&["route", "add", "//barker", "//barker", "10%"]);
    expect(1, &run);
    assert!(run.2.contains("SERVICE(VERSION)"), "{}", run.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_add_with_no_route_yet_shares_the_rest_among_live_versions() {
    let s = Setup::start(&["v1", "v1"]).await;
    // A service with no route: the live versions found in the directory take the rest.
    std::fs::remove_file(s.repo.work.join("routes/barker.yaml")).unwrap();
    expect(0, &s.dw(&["route", "add", "//barker", "//barker(v2)", "10%"]));
    assert_eq!(s.read("routes/barker.yaml"), "barker:\n  v1: 90\n  v2: 10\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_rejected_commit_with_its_error_and_each_sherlock() {
    let s = Setup::start(&["v1", "v1", "v2"]).await;
    let bad = s.repo.commit(&[("routes/barker.yaml", "barker:\n  v1: 90\n  v2: 30\n")], "oops: 120 percent");
    let answer = s.reconcile().await;
    assert_eq!(answer["rejected"]["commit"], bad.to_string(), "{answer}");

    let run = s.dw(&["status"]);
    expect(0, &run);
    let out = &run.1;
    let serving = out.lines().find(|l| l.trim_start().starts_with("serving")).unwrap_or_else(|| panic!("{out}"));
    assert!(serving.contains(&short(s.initial)) && serving.contains("initial routes"), "{out}");
    let rejected = out.lines().find(|l| l.contains("REJECTED")).unwrap_or_else(|| panic!("no rejection:\n{out}"));
    assert!(rejected.contains(&short(bad)) && rejected.contains("oops: 120 percent"), "{out}");
    assert!(out.lines().any(|l| l.contains("routes/barker.yaml:") && l.contains("120")), "the error:\n{out}");
    // The instances table: `barker  v1  2`.
    let count = |version: &str| {
        out.lines().map(|l| l.split_whitespace().collect::<Vec<_>>()).find_map(|f| match f[..] {
            ["barker", v, n] if v == version => n.parse::<usize>().ok(),
            _ => None,
        })
    };
    assert_eq!((count("v1"), count("v2")), (Some(2), Some(1)), "{out}");
    let sherlock = format!("test-{}", s.cluster.sherlock_port);
    let line = out.lines().find(|l| l.contains(&sherlock)).unwrap_or_else(|| panic!("no sherlock:\n{out}"));
    let index = s.cluster.status().await["index"].as_u64().unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    // NAME CLIENT APPLIED LAG LAST-SEEN: the cluster's sherlock follows client vm.
    assert_eq!(
        (fields[1], fields[2], fields[3]),
        ("vm", index.to_string().as_str(), "0"),
        "applied {index}, lag 0: {line}"
    );

    let run = s.dw(&["status", "--json"]);
    expect(0, &run);
    let json: serde_json::Value = serde_json::from_str(&run.1).unwrap();
    assert_eq!(json["routes"]["rejected"]["commit"], bad.to_string());

    // route list: desired weight, live instances and effective share.
    let run = s.dw(&["route", "list"]);
    expect(0, &run);
    let rows: Vec<&str> = run.1.lines().filter(|l| l.starts_with("barker")).collect();
    assert_eq!(rows.len(), 3, "{}", run.1);
    for row in rows {
        let fields: Vec<&str> = row.split_whitespace().collect();
        let want = if fields[1] == "v1" { ("100", "50.0%") } else { ("0", "0.0%") };
        assert_eq!((fields[2], fields[5]), want, "{row}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_set_directory_is_the_default_and_d_overrides_it() {
    let s = Setup::start(&["v1"]).await;
    let home = tempfile::tempdir().unwrap();
    let dw = |args: &[&str]| {
        let out = Command::new(bin("dw"))
            .args(args)
            .current_dir(&s.repo.work)
            .env("HOME", home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("DSTACK_DIRECTORY")
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
    };
    let url = s.cluster.directory_url();
    // In secure mode the token and the CA come from the same file, which
    // `config set` must keep.
    let file = home.path().join(".config/dstack/dw.yaml");
    let secure = s.cluster.client_config(&s.cluster.operator_token());
    if !secure.is_empty() {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, &secure).unwrap();
    }
    expect(0, &dw(&["config", "set", "directory", &url]));
    let written = std::fs::read_to_string(&file).unwrap();
    assert_eq!(written, format!("{secure}directory: {url}\n"));

    let run = dw(&["route", "list"]);
    expect(0, &run);
    assert!(run.1.lines().any(|l| l.starts_with("barker") && l.contains("100.0%")), "{}", run.1);
    let run = dw(&["-d", &format!("127.0.0.1:{}", free_port()), "route", "list"]);
    expect(1, &run);

    // XDG_CONFIG_HOME, when set, is where the file goes.
    let xdg = home.path().join("xdg");
    let out = Command::new(bin("dw"))
        .args(["config", "set", "directory", "//services/directory"])
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", &xdg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let written = std::fs::read_to_string(xdg.join("dstack/dw.yaml")).unwrap();
    assert_eq!(written, "directory: //services/directory\n");
    let run = dw(&["config", "set", "directory", "http://"]);
    expect(2, &run);
    let run = dw(&["config", "set", "colour", "red"]);
    expect(2, &run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_times_out_naming_the_sherlock_that_lags() {
    let s = Setup::start(&["v1", "v2"]).await;
    let sherlock = s.cluster.sherlock.as_ref().unwrap();
    expect(0, &s.dw(&["route", "set", "barker", "v1=90", "v2=10"]));
    // A sherlock that is alive but stuck never applies the commit.
    sherlock.signal(libc::SIGSTOP);
    let run = s.dw(&["apply", "--timeout", "2s"]);
    sherlock.signal(libc::SIGCONT);
    expect(1, &run);
    let name = format!("test-{}", s.cluster.sherlock_port);
    assert!(run.2.contains("timed out") && run.2.contains(&name), "names who lags: {}", run.2);
    // The commit is pushed and served; the sherlock catches up once it runs.
    assert_eq!(s.remote_head(), s.local_head());
    s.cluster.wait_for_commit(s.local_head()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_reverts_a_merged_pull_request_against_its_first_parent() {
    let s = Setup::start(&["v1", "v2"]).await;
    // The canary lands as a merged pull request: a branch commit, then a merge.
    let repo = &s.repo.repo;
    std::fs::write(s.repo.work.join("routes/barker.yaml"), CANARY).unwrap();
    let mut index = repo.index().unwrap();
    index.add_path(Path::new("routes/barker.yaml")).unwrap();
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = repo.signature().unwrap();
    let base = repo.find_commit(s.initial).unwrap();
    let branch = repo.commit(None, &sig, &sig, "barker: canary v2 at 10%", &tree, &[&base]).unwrap();
    let branch = repo.find_commit(branch).unwrap();
    let merge = repo
        .commit(Some("HEAD"), &sig, &sig, "Merge pull request #7 from ops/canary", &tree, &[&base, &branch])
        .unwrap();
    s.repo.push();
    s.reconcile().await;
    s.cluster.wait_for_commit(merge).await;

    let run = s.dw(&["rollback"]);
    expect(0, &run);
    let message = s.remote_message();
    assert!(message.starts_with("Revert \"Merge pull request #7 from ops/canary\""), "{message}");
    assert!(message.contains(&format!("This reverts commit {merge}, reversing\nchanges made to {}.", s.initial)));
    assert_eq!(s.read("routes/barker.yaml"), BARKER);
    let (counts, errors) = s.cluster.tally("/barker/", 50).await;
    assert_eq!((by_version(&counts).get("v1"), errors), (Some(&50), 0), "v2 must get nothing: {counts:?}");

    // The root commit has nothing before it: refused, and nothing pushed.
    let head = s.remote_head();
    let run = s.dw(&["rollback", &s.initial.to_string()]);
    expect(2, &run);
    assert!(run.2.contains("root commit"), "{}", run.2);
    assert_eq!(s.remote_head(), head);
}

/// Runs dw with stdout a pipe whose reader is already gone, as
/// `dw route list --json | head -1` leaves it once head has its line;
/// (exit code, stderr). HOME is `home`, so `config set` writes there.
fn dw_into_a_closed_pipe(s: &Setup, home: &Path, args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    // Closed before dw starts, so its first write meets the broken pipe.
    drop(reader);
    let directory = s.cluster.directory_url();
    let out = Command::new(bin("dw"))
        .args(["-d", &directory])
        .args(s.cluster.operator_flags())
        .args(args)
        .current_dir(&s.repo.work)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env("NO_COLOR", "1")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_list_json_piped_to_head_does_not_panic_on_the_broken_pipe() {
    let s = Setup::start(&["v1", "v2"]).await;
    let home = tempfile::tempdir().unwrap();
    // A working-tree change, so that plan has a long report to print.
    expect(0, &s.dw(&["route", "set", "barker", "v1=90", "v2=10"]));
    // Every command that prints; apply and rollback stop at their first line.
    let commands: [&[&str]; 10] = [
        &["route", "list", "--json"],
        &["route", "list"],
        &["status"],
        &["status", "--json"],
        &["plan"],
        &["plan", "--json"],
        &["route", "set", "barker", "v1=80", "v2=20"],
        &["config", "set", "directory", "127.0.0.1:7575"],
        &["apply", "-m", "barker: canary v2 at 20%"],
        &["rollback"],
    ];
    for args in commands {
        let (code, stderr) = dw_into_a_closed_pipe(&s, home.path(), args);
        assert!(!stderr.contains("panicked"), "dw {args:?} panicked on the closed pipe:\n{stderr}");
        assert_eq!((code, stderr.as_str()), (Some(0), ""), "dw {args:?} ends quietly with success");
    }
}

/// A directory following `repo`, with no sherlock, once it serves `commit`.
async fn lone_directory(repo: &RoutesRepo, commit: git2::Oid) -> Cluster {
    let cluster = Cluster::directory_alone(&["--repo", &repo.url(), "--poll", "1h"]).await;
    let want = commit.to_string();
    eventually(std::time::Duration::from_secs(15), "the directory to serve the first commit", async || {
        (cluster.status().await["commit"] == want.as_str()).then_some(())
    })
    .await;
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_with_no_sherlock_subscribed_does_not_report_success() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let initial = repo.commit(&[("routes/barker.yaml", BARKER)], "initial routes");
    let directory = lone_directory(&repo, initial).await;
    let dw = |args: &[&str]| directory.dw_in(&repo.work, args);

    expect(0, &dw(&["route", "set", "barker", "v1=90", "v2=10"]));
    let run = dw(&["apply", "--timeout", "1s"]);
    expect(1, &run);
    assert!(run.1.contains("Pushed to origin/main"), "{}", run.1);
    assert!(!run.1.contains("sherlocks applied it"), "no success line: {}", run.1);
    assert!(run.2.contains("timed out") && run.2.contains("no sherlock is subscribed"), "says why: {}", run.2);
    // The directory does serve it: only the claim of convergence is refused.
    let head = repo.repo.head().unwrap().peel_to_commit().unwrap().id();
    let status = directory.status().await;
    assert_eq!(status["commit"], head.to_string(), "{status}");
}

/// Runs dw in `cwd` with exactly the given environment for its defaults:
/// HOME and XDG_CONFIG_HOME under `home`, and DSTACK_DIRECTORY when given.
fn dw_with_env(cwd: &Path, home: &Path, env_directory: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(bin("dw"));
    cmd.args(args)
        .current_dir(cwd)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("xdg"))
        .env_remove("DSTACK_DIRECTORY")
        .env("NO_COLOR", "1");
    if let Some(directory) = env_directory {
        cmd.env("DSTACK_DIRECTORY", directory);
    }
    let out = cmd.output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dw_takes_its_directory_from_d_then_dstack_directory_then_its_config_file() {
    let s = Setup::start(&["v1"]).await;
    let home = tempfile::tempdir().unwrap();
    let live = s.cluster.directory_url();
    // Nothing listens here: a run that picks it fails naming it.
    let dead = format!("127.0.0.1:{}", free_port());
    let config = home.path().join("xdg/dstack/dw.yaml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    // In secure mode the file also holds the token and the CA, which dw
    // takes from it whichever way it picks its directory.
    let secure = s.cluster.client_config(&s.cluster.operator_token());
    let write_config = |directory: &str| std::fs::write(&config, format!("directory: {directory}\n{secure}")).unwrap();
    let lists_barker = |run: &(i32, String, String)| {
        expect(0, run);
        assert!(run.1.lines().any(|l| l.starts_with("barker") && l.contains("100.0%")), "{}", run.1);
    };
    let used_dead = |run: &(i32, String, String)| {
        expect(1, run);
        assert!(run.2.contains(&dead) && run.2.contains("unreachable"), "names {dead}: {}", run.2);
    };
    let dw = |env: Option<&str>, args: &[&str]| dw_with_env(&s.repo.work, home.path(), env, args);

    // The config file alone.
    write_config(&live);
    lists_barker(&dw(None, &["route", "list"]));
    write_config(&dead);
    used_dead(&dw(None, &["route", "list"]));
    // DSTACK_DIRECTORY beats the config file, both ways round.
    lists_barker(&dw(Some(&live), &["route", "list"]));
    write_config(&live);
    used_dead(&dw(Some(&dead), &["route", "list"]));
    // -d beats both, both ways round.
    write_config(&dead);
    lists_barker(&dw(Some(&dead), &["-d", &live, "route", "list"]));
    write_config(&live);
    used_dead(&dw(Some(&live), &["-d", &dead, "route", "list"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_of_a_commit_that_is_not_the_newest_reverts_only_that_commit() {
    let s = Setup::start(&["v1", "v2"]).await;
    let canary = s.repo.commit(&[("routes/barker.yaml", CANARY)], "barker: canary v2 at 10%");
    let emitter = "# the pipeline's source\nemitter: {v1: 50, v2: 50}\n";
    let newest = s.repo.commit(&[("routes/emitter.yaml", emitter)], "emitter: v2 at half");
    s.reconcile().await;
    s.cluster.wait_for_commit(newest).await;

    let run = s.dw(&["rollback", &canary.to_string()]);
    expect(0, &run);
    assert!(run.1.contains(&format!("Reverted {}", short(canary))), "{}", run.1);
    let revert = s.remote_head();
    assert_eq!(s.local_head(), revert);
    let message = s.remote_message();
    assert!(message.starts_with("Revert \"barker: canary v2 at 10%\""), "{message}");
    assert!(message.contains(&format!("This reverts commit {canary}.")), "{message}");

    // Exactly that commit's change is undone, on top of the newest.
    let repo = &s.repo.repo;
    let commit = repo.find_commit(revert).unwrap();
    assert_eq!(commit.parent_ids().collect::<Vec<_>>(), [newest]);
    let diff =
        repo.diff_tree_to_tree(Some(&commit.parent(0).unwrap().tree().unwrap()), Some(&commit.tree().unwrap()), None);
    let changed: Vec<String> =
        diff.unwrap().deltas().map(|d| d.new_file().path().unwrap().to_str().unwrap().to_string()).collect();
    assert_eq!(changed, ["routes/barker.yaml"]);
    assert_eq!(s.read("routes/barker.yaml"), BARKER);
    assert_eq!(s.read("routes/emitter.yaml"), emitter, "the newer commit stays");

    // ...and it is what the directory serves and the sherlock routes by.
    let status = s.cluster.status().await;
    assert_eq!(status["commit"], revert.to_string());
    assert_eq!(status["desired"]["routes"]["barker"]["weights"], serde_json::json!({"v1": 100}), "{status}");
    assert_eq!(status["desired"]["routes"]["emitter"]["weights"], serde_json::json!({"v1": 50, "v2": 50}), "{status}");
    let (counts, errors) = s.cluster.tally("/barker/", 50).await;
    assert_eq!((by_version(&counts).get("v1"), errors), (Some(&50), 0), "v2 must get nothing: {counts:?}");
}
