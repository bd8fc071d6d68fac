//! The directory alone, through its HTTP API: a burst of heartbeats is
//! published as few snapshots, and `GET /` is a plain-text status page.

mod common;

use std::time::{Duration, Instant};

use common::*;

async fn published(http: &reqwest::Client, url: &str) -> u64 {
    let text = http.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
    metric(&text, "dstack_directory_snapshots_published_total")
}

fn heartbeat(service: &str, port: u16, path: &str) -> String {
    format!(r#"{{"service":"{service}","version":"v1","url":"http://127.0.0.1:{port}{path}","ttl_ms":60000}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_heartbeats_is_published_as_fewer_snapshots_with_all_of_them() {
    let tmp = tempfile::tempdir().unwrap();
    // Warming lasts the whole test, so its end publishes nothing extra.
    let (url, _directory) = lone_directory(tmp.path(), &["--max-ttl", "60s"]).await;
    let http = reqwest::Client::new();
    let before = published(&http, &url).await;

    // 500 instances register at once, as after a directory restart.
    const N: u16 = 500;
    let started = Instant::now();
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..N {
        let (http, url) = (http.clone(), url.clone());
        puts.spawn(async move {
            let resp =
                http.put(format!("{url}/v1/instances/burst-{i}")).body(heartbeat("burst", 20000 + i, "/b")).send();
            resp.await.unwrap().status()
        });
    }
    while let Some(status) = puts.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let burst = started.elapsed();
    // The last change may wait for the publish timer: all present at the end.
    let snapshot: serde_json::Value =
        eventually(Duration::from_secs(10), "every instance in the snapshot", async || {
            let snapshot: serde_json::Value =
                http.get(format!("{url}/v1/snapshot")).send().await.ok()?.json().await.ok()?;
            (snapshot["services"]["burst"]["backends"].as_array()?.len() == usize::from(N)).then_some(snapshot)
        })
        .await;
    let published = published(&http, &url).await - before;

    eprintln!("{published} snapshots for {N} heartbeats in {burst:?}");
    // Publishes are at least 10 ms apart: at most one per 10 ms of burst,
    // and one more for the change left over at its end.
    let bound = burst.as_millis() as u64 / 10 + 2;
    assert!(published >= 1 && published <= bound, "{published} snapshots for a {burst:?} burst (at most {bound})");
    assert!(published < u64::from(N) / 2, "{published} snapshots for {N} changes: not coalesced");
    // Each publish is one index: none was skipped or doubled.
    assert_eq!(snapshot["index"].as_u64(), Some(1 + before + published), "{}", snapshot["index"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_lists_instances_and_warnings_in_plain_text() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, _directory) = lone_directory(tmp.path(), &["-n", "services", "--max-ttl", "60s"]).await;
    let http = reqwest::Client::new();
    // Two instances of one service whose paths differ: a warning.
    for (id, port, path) in [("e1", 9001, "/emitter"), ("e2", 9002, "/elsewhere")] {
        let resp = http.put(format!("{url}/v1/instances/{id}")).body(heartbeat("emitter", port, path)).send().await;
        assert_eq!(resp.unwrap().status(), 200);
    }
    // The second change may wait for the publish timer.
    let status = eventually(Duration::from_secs(10), "the path warning in the snapshot", async || {
        let status: serde_json::Value = http.get(format!("{url}/v1/status")).send().await.ok()?.json().await.ok()?;
        (!status["warnings"].as_array()?.is_empty()).then_some(status)
    })
    .await;
    let warnings = status["warnings"].as_array().unwrap();

    let resp = http.get(format!("{url}/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let page = resp.text().await.unwrap();
    let first = page.lines().next().unwrap();
    let head = format!("dstack directory services (snapshot {}, up ", status["index"]);
    assert!(first.starts_with(&head), "{page}");
    for (port, path) in [(9001, "/emitter"), (9002, "/elsewhere")] {
        let url = format!("http://127.0.0.1:{port}{path}");
        let line = page.lines().find(|l| l.contains(&url)).unwrap_or_else(|| panic!("{url} missing:\n{page}"));
        assert!(line.starts_with("emitter") && line.contains(" v1 ") && line.ends_with("ms ago"), "{line}");
    }
    for warning in warnings {
        assert!(page.contains(&format!("warning: {}", warning.as_str().unwrap())), "{warning} missing:\n{page}");
    }
}
