//! Credentials in a routes repo URL are for git alone: status, the
//! reconcile answer, errors and logs show the URL without them.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_repo_url_never_reach_status_errors_or_logs() {
    // A port nobody listens on: every fetch fails, and the error names the URL.
    let port = free_port();
    let url = format!("http://alice:s3cret-token@127.0.0.1:{port}/ops/routes.git");
    let cluster = Cluster::start_with(&["--repo", &url, "--poll", "1h"]).await;
    let answer = cluster.reconcile().await;
    let status = eventually(Duration::from_secs(10), "the failed fetch in status", async || {
        let status = cluster.status().await;
        status["routes"]["error"].is_string().then_some(status)
    })
    .await;
    assert_eq!(status["routes"]["repo"], format!("http://***@127.0.0.1:{port}/ops/routes.git"));
    let error = status["routes"]["error"].as_str().unwrap();
    assert!(error.contains(&format!("***@127.0.0.1:{port}")), "the error still names the repo: {error}");
    let log = cluster.directory.log_text();
    assert!(log.contains("***@127.0.0.1"), "the log names the repo: {log}");
    for (what, text) in [("status", status.to_string()), ("reconcile answer", answer.to_string()), ("log", log)] {
        assert!(!text.contains("s3cret"), "the password leaked into the {what}: {text}");
        assert!(!text.contains("alice"), "the user leaked into the {what}: {text}");
    }
}
