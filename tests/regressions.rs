//! Regression tests for bugs fixed in the redesign, each named after its bug,
//! end to end: real binaries, real git repos, real HAProxy.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_commit_is_cleared_when_the_branch_head_moves_back_to_the_commit_in_force() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let good = repo.commit(&[("routes/barker.yaml", "barker: {v1: 100}\n")], "good");
    let url = repo.url();
    let cluster = Cluster::start_with(&["--repo", &url, "--poll", "1h"]).await;
    assert_eq!(cluster.reconcile().await["commit"], good.to_string());

    let bad = repo.commit(&[("routes/barker.yaml", "barker: {v1: 90}\n")], "bad");
    let answer = cluster.reconcile().await;
    assert_eq!(answer["rejected"]["commit"], bad.to_string(), "{answer}");

    // A force-push rewinds the branch to the commit in force.
    let target = repo.repo.find_commit(good).unwrap();
    repo.repo.reset(target.as_object(), git2::ResetType::Hard, None).unwrap();
    let mut remote = repo.repo.find_remote("origin").unwrap();
    remote.push(&["+refs/heads/main:refs/heads/main"], None).unwrap();

    let answer = cluster.reconcile().await;
    assert_eq!(answer["commit"], good.to_string(), "{answer}");
    assert!(answer["rejected"].is_null(), "the rejected commit is no longer the head: {answer}");
    assert!(cluster.status().await["routes"]["rejected"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_file_that_is_not_utf8_is_rejected_by_the_directory_as_by_dw() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let good = repo.commit(&[("routes/barker.yaml", "barker: {v1: 100}\n")], "good");
    let url = repo.url();
    let cluster = Cluster::start_with(&["--repo", &url, "--poll", "1h"]).await;
    assert_eq!(cluster.reconcile().await["commit"], good.to_string());

    // Latin-1 "é" in a comment: the directory used to decode it lossily.
    std::fs::write(repo.work.join("routes/barker.yaml"), b"# caf\xe9\nbarker: {v1: 100}\n").unwrap();
    let bad = repo.commit(&[], "latin-1");
    let answer = cluster.reconcile().await;
    assert_eq!(answer["commit"], good.to_string(), "{answer}");
    assert_eq!(answer["rejected"]["commit"], bad.to_string(), "{answer}");
    let error = answer["rejected"]["errors"][0].as_str().unwrap();
    assert_eq!(error, "routes/barker.yaml:1:1: the file is not UTF-8 text; routes files are UTF-8 YAML");

    let work = repo.work.to_str().unwrap();
    let (code, _, stderr) = cluster.dw(&["plan", "--repo", work]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(error), "dw names the same error: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dotted_service_name_routes_end_to_end() {
    let cluster = Cluster::start().await;
    let instance = Instance::start("dotted").await;
    let _watson = cluster.watson("//services/barker.internal", &instance.url("/barker"), &[]);
    cluster.wait_for_instances("barker.internal", 1).await;
    let (status, body) = cluster.get("/barker.internal/bark").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("dotted "), "{body}");
    assert!(body.contains("/barker/bark"), "the prefix is replaced by the instance's path: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_directory_is_a_new_epoch_and_sherlock_follows_it() {
    let mut cluster = Cluster::start().await;
    let instance = Instance::start("e").await;
    let _watson = cluster.watson("emitter", &instance.url("/emitter"), &[]);
    cluster.wait_for_instances("emitter", 1).await;
    let before = cluster.status().await;
    let old_epoch = before["epoch"].as_u64().unwrap();
    assert!(before["index"].as_u64().unwrap() >= 2);

    cluster.restart_directory().await;
    let status = eventually(Duration::from_secs(15), "sherlock to apply the new run's snapshot", async || {
        let status = cluster.status().await;
        let epoch = status["epoch"].as_u64()?;
        let sherlock = status["sherlocks"].as_array()?.first()?.clone();
        (epoch > old_epoch && sherlock["applied_epoch"] == epoch && sherlock["applied"] == status["index"])
            .then_some(status)
    })
    .await;
    assert!(status["index"].as_u64().unwrap() < 10, "a new run counts from 1 again: {status}");
    let (code, body) = cluster.get("/emitter/").await.unwrap();
    assert_eq!(code, 200, "{body}");
}
