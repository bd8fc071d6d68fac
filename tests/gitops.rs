//! Routes and canary weights from git: real git repos made with git2, a real
//! directory following them, watsons, sherlocks and HAProxy.

mod common;

use std::time::Duration;

use common::*;

const CANARY: &str = "# the barker canary\nbarker:\n  v1: 90\n  v2: 10\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_splits_90_10_a_bad_commit_is_kept_out_and_a_revert_ends_it() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let initial = repo.commit(&[("routes/barker.yaml", "barker: {v1: 100}\n"), ("README.md", "routes\n")], "initial");
    let url = repo.url();
    let cluster = Cluster::start_with(&["--repo", &url, "--poll", "1h"]).await;
    let (_instances, _watsons) = cluster.fleet("barker", &["v1", "v1", "v1", "v2", "v3"]).await;
    cluster.wait_for_instances("barker", 5).await;
    cluster.wait_for_commit(initial).await;
    let (counts, errors) = cluster.tally("/barker/", 30).await;
    assert_eq!((by_version(&counts).get("v1"), errors), (Some(&30), 0), "{counts:?}");

    let canary = repo.commit(&[("routes/barker.yaml", CANARY)], "barker: canary v2 at 10%");
    let answer = cluster.reconcile().await;
    assert_eq!(answer["commit"], canary.to_string(), "{answer}");
    cluster.wait_for_commit(canary).await;
    let (counts, errors) = cluster.tally("/barker/", 1000).await;
    let versions = by_version(&counts);
    assert_eq!(errors, 0);
    let v2 = *versions.get("v2").unwrap_or(&0);
    assert!((80..=120).contains(&v2), "v2 got {v2} of 1000: {versions:?}");
    assert_eq!(versions.get("v3"), None, "an unlisted version gets nothing: {versions:?}");

    // A commit whose weights sum to 120 is rejected whole; traffic stays.
    let bad = repo.commit(&[("routes/barker.yaml", "barker:\n  v1: 90\n  v2: 30\n")], "oops");
    let answer = cluster.reconcile().await;
    assert_eq!(answer["commit"], canary.to_string(), "the last good commit stays: {answer}");
    assert_eq!(answer["rejected"]["commit"], bad.to_string());
    let errors = answer["rejected"]["errors"].as_array().unwrap();
    let first = errors[0].as_str().unwrap();
    assert!(first.starts_with("routes/barker.yaml:") && first.contains("120"), "{errors:?}");
    let status = cluster.status().await;
    assert_eq!(status["routes"]["rejected"]["commit"], bad.to_string());
    assert_eq!(status["commit"], canary.to_string());
    let (counts, _) = cluster.tally("/barker/", 200).await;
    let v2 = *by_version(&counts).get("v2").unwrap_or(&0);
    assert!((15..=25).contains(&v2), "still 90/10 after the bad commit: {counts:?}");

    // Reverting the bad commit is accepted and clears the rejection.
    let fixed = repo.revert(bad);
    cluster.reconcile().await;
    cluster.wait_for_commit(fixed).await;
    assert!(cluster.status().await["routes"]["rejected"].is_null());

    // Killing the canary: revert its commit; v2 loses all its traffic.
    let revert = repo.revert(canary);
    let answer = cluster.reconcile().await;
    assert_eq!(answer["commit"], revert.to_string());
    cluster.wait_for_commit(revert).await;
    let (counts, errors) = cluster.tally("/barker/", 200).await;
    assert_eq!((by_version(&counts).get("v1"), errors), (Some(&200), 0), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_commit_is_picked_up_by_polling_and_at_once_by_the_webhook() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let first = repo.commit(&[("routes/barker.yaml", "barker: {v1: 100}\n")], "first");
    // A file:// URL is a remote like any other: no file watch, only polls and webhooks.
    let url = format!("file://{}", repo.url());
    let cluster = Cluster::start_with(&["--repo", &url, "--poll", "500ms"]).await;
    cluster.wait_for_commit(first).await;
    let second = repo.commit(&[("routes/barker.yaml", CANARY)], "second");
    // No webhook: the poll alone finds it.
    cluster.wait_for_commit(second).await;

    let webhook_only = Cluster::start_with(&["--repo", &url, "--poll", "1h"]).await;
    webhook_only.wait_for_commit(second).await;
    let third = repo.commit(&[("routes/barker.yaml", "barker: {v1: 50, v2: 50}\n")], "third");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(webhook_only.status().await["commit"], second.to_string(), "no poll within the hour");
    let answer = webhook_only.reconcile().await;
    assert_eq!(answer["commit"], third.to_string(), "the webhook answers with the commit now served");
    assert!(answer["fetched_at"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_path_repo_is_picked_up_by_its_file_watch() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let first = repo.commit_local(&[("routes/barker.yaml", "barker: {v1: 100}\n")], "first");
    let path = repo.work.to_str().unwrap().to_string();
    let cluster = Cluster::start_with(&["--repo", &path, "--poll", "1h"]).await;
    cluster.wait_for_commit(first).await;
    let second = repo.commit_local(&[("routes/barker.yaml", CANARY)], "second");
    cluster.wait_for_commit(second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_its_own_route_follows_it_while_others_follow_the_service() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let routes = "barker:\n  weights: {v1: 100, v2: 0}\n  clients:\n    monolith: {v1: 0, v2: 100}\n";
    let commit = repo.commit(&[("routes/barker.yaml", routes)], "monolith tries v2");
    let url = repo.url();
    let cluster = Cluster::start_with(&["--repo", &url, "--poll", "1h"]).await;
    let (monolith_port, _monolith) = cluster.start_sherlock(&["--client", "monolith"]).await;
    let (_instances, _watsons) = cluster.fleet("barker", &["v1", "v2"]).await;
    cluster.wait_for_instances("barker", 2).await;
    cluster.wait_for_commit(commit).await;

    let (counts, _) = cluster.tally("/barker/", 20).await;
    assert_eq!(by_version(&counts).get("v1"), Some(&20), "the default sherlock: {counts:?}");
    let mut v2 = 0;
    for _ in 0..20 {
        let (_, body) = get_via(&cluster.http, monolith_port, "/barker/").await.unwrap();
        v2 += usize::from(body.starts_with("v2-"));
    }
    assert_eq!(v2, 20, "the monolith sherlock follows its own entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_follows_its_branch_and_routes_dir_only() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    // The default folder holds a decoy; the one followed says all on v2.
    let prod = repo.commit_local(
        &[
            ("routes/barker.yaml", "barker: {v1: 100, v2: 0}\n"),
            ("deploy/routes/barker.yaml", "barker: {v1: 0, v2: 100}\n"),
        ],
        "prod routes",
    );
    repo.push_to("prod");
    // main moves on; the directory follows prod, so it never sees this.
    let main = repo.commit(&[("deploy/routes/barker.yaml", "barker: {v1: 50, v2: 50}\n")], "main only");
    let url = repo.url();
    let cluster =
        Cluster::start_with(&["--repo", &url, "--branch", "prod", "--routes-dir", "deploy/routes", "--poll", "1h"])
            .await;
    let (_instances, _watsons) = cluster.fleet("barker", &["v1", "v2"]).await;
    cluster.wait_for_instances("barker", 2).await;
    cluster.wait_for_commit(prod).await;
    let status = cluster.status().await;
    assert_eq!(status["routes"]["branch"], "prod", "{status}");
    assert_eq!(status["desired"]["routes"]["barker"]["weights"], serde_json::json!({"v1": 0, "v2": 100}), "{status}");
    let (counts, errors) = cluster.tally("/barker/", 20).await;
    assert_eq!((by_version(&counts).get("v2"), errors), (Some(&20), 0), "{counts:?}");

    // A push to prod is picked up; main's own head never was.
    let answer = cluster.reconcile().await;
    assert_eq!(answer["commit"], prod.to_string(), "main's {main} is not followed: {answer}");
    let next = repo.commit_local(&[("deploy/routes/barker.yaml", "barker: {v1: 100, v2: 0}\n")], "prod back to v1");
    repo.push_to("prod");
    cluster.reconcile().await;
    cluster.wait_for_commit(next).await;
    let (counts, _) = cluster.tally("/barker/", 20).await;
    assert_eq!(by_version(&counts).get("v1"), Some(&20), "{counts:?}");
}

/// This host's name, as sherlock reads it for its default `--client`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sherlock_follows_the_route_of_its_host_name_by_default() {
    let host = host_name();
    let valid = host.len() <= 63
        && host.starts_with(|c: char| c.is_ascii_alphanumeric())
        && host.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c));
    assert!(valid, "this test needs a host name that is a valid client name, not {host:?}");
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let routes = format!("barker:\n  weights: {{v1: 100, v2: 0}}\n  clients:\n    {host}: {{v1: 0, v2: 100}}\n");
    let commit = repo.commit(&[("routes/barker.yaml", &routes)], "this host tries v2");
    let url = repo.url();
    // The cluster's sherlock is given no --client; another names a client.
    let cluster = Cluster::start_with(&["--repo", &url, "--poll", "1h"]).await;
    let (other_port, _other) = cluster.start_sherlock(&["--client", "elsewhere"]).await;
    let (_instances, _watsons) = cluster.fleet("barker", &["v1", "v2"]).await;
    cluster.wait_for_instances("barker", 2).await;
    cluster.wait_for_commit(commit).await;

    assert_eq!(cluster.sherlock_status(cluster.sherlock_port).await["client"], host.as_str());
    let (counts, errors) = cluster.tally("/barker/", 20).await;
    assert_eq!((by_version(&counts).get("v2"), errors), (Some(&20), 0), "the host's own route: {counts:?}");
    let (counts, errors) = cluster.tally_via(other_port, "/barker/", 20).await;
    assert_eq!((by_version(&counts).get("v1"), errors), (Some(&20), 0), "another client: {counts:?}");
}
