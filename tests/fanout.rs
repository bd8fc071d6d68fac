//! The directory's snapshot answers: each sherlock gets its own client's
//! view only, gzipped when it asks; a real directory with tokens and TLS,
//! a routes repo, watsons, two sherlocks and their HAProxies.

mod common;

use std::io::Read as _;
use std::time::Duration;

use common::*;

/// alpha's sherlocks send barker to v1 only, beta's to v2 only, everyone
/// else splits it.
const ROUTES: &str =
    "barker:\n  weights: {v1: 50, v2: 50}\n  clients:\n    alpha: {v1: 100, v2: 0}\n    beta: {v1: 0, v2: 100}\n";

/// A snapshot answer: its Content-Encoding, and its body decoded.
async fn snapshot_as(http: &reqwest::Client, url: &str, gzip: bool) -> (Option<String>, Vec<u8>) {
    let mut req = http.get(url);
    if gzip {
        req = req.header(reqwest::header::ACCEPT_ENCODING, "gzip");
    }
    let resp = req.send().await.unwrap();
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    let coding = resp.headers().get(reqwest::header::CONTENT_ENCODING).map(|v| v.to_str().unwrap().to_string());
    let body = resp.bytes().await.unwrap().to_vec();
    if coding.is_none() {
        return (coding, body);
    }
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut plain).unwrap();
    (coding, plain)
}

fn client_names(json: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(json).unwrap();
    v["clients"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sherlock_receives_its_own_clients_overrides_only_and_both_route_right() {
    // Tokens bound to a client need an auth file: this file's clusters are
    // always secure (the tests here all set the same value).
    std::env::set_var("DSTACK_TEST_SECURE", "1");
    let tmp = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(tmp.path());
    let commit = repo.commit(&[("routes/barker.yaml", ROUTES)], "alpha on v1, beta on v2");
    let url = repo.url();
    let cluster = Cluster::directory_alone(&["--repo", &url, "--poll", "1h"]).await;
    let security = cluster.security.as_ref().expect("a secure cluster");

    // One sherlock token per client, made before its sherlock starts (so
    // the cluster uses it) and read by the directory on SIGHUP.
    let mut sherlocks = Vec::new();
    for client in ["alpha", "beta"] {
        let port = free_port();
        let name = Cluster::sherlock_name(port);
        let token = cluster.dir.path().join(format!("{name}.token"));
        let entry = format!("name: {name}\n    role: sherlock\n    client: {client}");
        security.add_token(&token, &format!("s-{client}-{port}"), &entry);
        sherlocks.push((client, port, token));
    }
    cluster.directory.signal(libc::SIGHUP);
    let snapshot_url = format!("{}/v1/snapshot", cluster.directory_url());
    let alpha_http = security.http(&sherlocks[0].2).timeout(Duration::from_secs(10)).build().unwrap();
    eventually(Duration::from_secs(10), "the directory to take the new tokens", async || {
        let resp = alpha_http.get(&snapshot_url).send().await.ok()?;
        resp.status().is_success().then_some(())
    })
    .await;
    let mut procs = Vec::new();
    for (client, port, _) in &sherlocks {
        procs.push(cluster.start_sherlock_at(*port, &["--client", client]).await.1);
    }
    let (_instances, _watsons) = cluster.fleet("barker", &["v1", "v2"]).await;
    cluster.wait_for_instances("barker", 2).await;
    cluster.wait_for_commit(commit).await;

    // Each sherlock follows its own client's route.
    for ((client, port, _), version) in sherlocks.iter().zip(["v1", "v2"]) {
        eventually(Duration::from_secs(15), &format!("{client}'s sherlock to send barker to {version}"), async || {
            let (counts, errors) = cluster.tally_via(*port, "/barker/", 10).await;
            (errors == 0 && by_version(&counts).get(version) == Some(&10)).then_some(())
        })
        .await;
    }

    // The raw answers to alpha's token: beta's override never in them,
    // whether the query names alpha or no client (the token says which),
    // plain or gzipped.
    let index = cluster.status().await["index"].as_u64().unwrap();
    for query in ["", "?client=alpha", "?client=alpha&sherlock=x&epoch=0&index=0"] {
        for gzip in [false, true] {
            let (coding, body) = snapshot_as(&alpha_http, &format!("{snapshot_url}{query}"), gzip).await;
            assert_eq!(coding.as_deref(), gzip.then_some("gzip"), "{query}");
            let text = String::from_utf8(body.clone()).unwrap();
            assert!(!text.contains("beta"), "alpha's token was sent beta's override ({query}, gzip {gzip}): {text}");
            assert_eq!(client_names(&body), ["alpha"], "{query}: {text}");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(v["index"].as_u64().unwrap() >= index);
        }
    }
    // Nor may it ask for beta's.
    let resp = alpha_http.get(format!("{snapshot_url}?client=beta")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 403, "{}", resp.text().await.unwrap());

    // The operator's query names no client: every client's overrides, as
    // before, and the gzipped body decodes to the plain one byte for byte
    // (an older sherlock that does not ask for gzip gets that plain JSON).
    let (coding, plain) = snapshot_as(&cluster.http, &snapshot_url, false).await;
    assert_eq!(coding, None);
    assert_eq!(client_names(&plain), ["alpha", "beta"]);
    let (_, unzipped) = snapshot_as(&cluster.http, &snapshot_url, true).await;
    assert_eq!(unzipped, plain);
}
