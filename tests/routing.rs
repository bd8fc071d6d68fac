//! Request routing by map: sherlock's frontend picks the backend with one
//! lookup of the first path segment in `services.map` (README, "Request
//! routing"). Real directory, watsons, sherlock and HAProxy.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;

/// The 404 dstack's `dstack_no_service` backend answers.
const NO_SERVICE: &str = "dstack: no service by that name; call http://localhost:8000/<service>/...\n";

/// service -> backend, as the running HAProxy holds the map (`show map`),
/// which is what routes, whatever the file on disk says.
fn running_map(run_dir: &Path) -> BTreeMap<String, String> {
    let map = run_dir.join("services.map");
    let text = socket_command(&run_dir.join("admin.sock"), &format!("show map {}", map.display()));
    text.lines()
        .filter_map(|line| {
            // `<ref> <key> <value>`
            let mut words = line.split_whitespace().skip(1);
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect()
}

/// service -> backend, as the file in the run dir holds it.
fn map_file(run_dir: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(run_dir.join("services.map")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap_or_else(|| panic!("{l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn expected(services: &[&str]) -> BTreeMap<String, String> {
    services.iter().map(|s| (s.to_string(), format!("svc_{s}"))).collect()
}

async fn get(cluster: &Cluster, port: u16, path: &str) -> (u16, String) {
    get_via(&cluster.http, port, path).await.unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_path_segment_picks_the_service_through_the_map() {
    let cluster = Cluster::start().await;
    let port = cluster.sherlock_port;
    let run_dir = cluster.run_dir(port);
    // Names that share prefixes, a dot, and a service at the instance's root.
    let alpha = Instance::start("alpha-1").await;
    let alpha_two = Instance::start("alpha-two-1").await;
    let dotted = Instance::start("b.x-1").await;
    let rooted = Instance::start("rooted-1").await;
    let _watsons = [
        cluster.watson("alpha", &alpha.url("/alpha"), &[]),
        cluster.watson("alpha-two", &alpha_two.url("/api"), &[]),
        cluster.watson("b.x", &dotted.url("/b.x"), &[]),
        cluster.watson("rooted", &rooted.url(""), &[]),
    ];
    for service in ["alpha", "alpha-two", "b.x", "rooted"] {
        cluster.wait_for_instances(service, 1).await;
    }
    let four = expected(&["alpha", "alpha-two", "b.x", "rooted"]);
    assert_eq!(map_file(&run_dir), four, "the map sherlock wrote beside haproxy.cfg");
    assert_eq!(running_map(&run_dir), four, "the map HAProxy routes by");

    for (path, want) in [
        ("/alpha", "alpha-1 /alpha"),
        ("/alpha/", "alpha-1 /alpha/"),
        ("/alpha/x?y", "alpha-1 /alpha/x?y"),
        ("/alpha?q=1", "alpha-1 /alpha?q=1"),
        ("/alpha-two", "alpha-two-1 /api"),
        ("/alpha-two/x/y?z", "alpha-two-1 /api/x/y?z"),
        ("/b.x/", "b.x-1 /b.x/"),
        ("/rooted", "rooted-1 /"),
        ("/rooted/", "rooted-1 /"),
        ("/rooted/x?y", "rooted-1 /x?y"),
    ] {
        assert_eq!(get(&cluster, port, path).await, (200, want.to_string()), "{path}");
    }
    // Unknown segments, case, prefixes of a name, the root and an empty
    // first segment all get dstack's own 404.
    for path in ["/", "/?x", "/nope", "/nope/x?y", "/ALPHA/", "/alph/", "/alphax", "/alpha-", "/b/", "//alpha/"] {
        assert_eq!(get(&cluster, port, path).await, (404, NO_SERVICE.to_string()), "{path}");
    }

    // A service added later: its backend comes with a reload, its map line
    // with it.
    cluster.wait_until_warm().await;
    let late = Instance::start("late-1").await;
    let mut late_watson = cluster.watson("late", &late.url("/late"), &[]);
    cluster.wait_for_instances("late", 1).await;
    let five = expected(&["alpha", "alpha-two", "b.x", "late", "rooted"]);
    assert_eq!(map_file(&run_dir), five);
    assert_eq!(running_map(&run_dir), five);
    assert_eq!(get(&cluster, port, "/late/x?y").await, (200, "late-1 /late/x?y".to_string()));
    assert_eq!(get(&cluster, port, "/alpha/").await, (200, "alpha-1 /alpha/".to_string()), "the others still route");

    // And removed (its watson deregisters it on SIGTERM): unmapped, 404.
    late_watson.stop();
    cluster.wait_for_instances("late", 0).await;
    eventually(Duration::from_secs(15), "late to leave the running map", async || {
        (running_map(&run_dir) == four).then_some(())
    })
    .await;
    assert_eq!(map_file(&run_dir), four);
    assert_eq!(get(&cluster, port, "/late/x").await, (404, NO_SERVICE.to_string()));
    assert_eq!(get(&cluster, port, "/rooted/x").await, (200, "rooted-1 /x".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_fails_its_check_leaves_the_map_that_runs() {
    // A template that breaks the config once a second service exists: the
    // check fails, so the map written for it must be put back, or a restart
    // of HAProxy would route by a map its config never had.
    let cluster = Cluster::directory_alone(&[]).await;
    let builtin = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/haproxy.cfg.j2")).unwrap();
    let template = cluster.dir.path().join("breaks.cfg.j2");
    std::fs::write(
        &template,
        format!("{builtin}\n{{% if services|length > 1 %}}\nbackend broken\n    balance nonesuch\n{{% endif %}}\n"),
    )
    .unwrap();
    let (port, sherlock) = cluster.start_sherlock(&["--template", template.to_str().unwrap()]).await;
    let run_dir = cluster.run_dir(port);
    let a = Instance::start("a-1").await;
    let _wa = cluster.watson("first", &a.url(""), &[]);
    cluster.wait_for_instances("first", 1).await;
    assert_eq!(map_file(&run_dir), expected(&["first"]));

    let b = Instance::start("b-1").await;
    let _wb = cluster.watson("second", &b.url(""), &[]);
    let error = eventually(Duration::from_secs(15), "the failed check in sherlock's /status", async || {
        cluster.sherlock_status(port).await["last_error"].as_str().map(str::to_string)
    })
    .await;
    assert!(error.contains("balance only supports"), "haproxy -c refused the candidate: {error}");
    // Each retry writes the candidate's map for its check and puts the old
    // one back after; between retries the running one is in place.
    eventually(Duration::from_secs(10), "the running map back in place", async || {
        (map_file(&run_dir) == expected(&["first"])).then_some(())
    })
    .await;
    assert_eq!(running_map(&run_dir), expected(&["first"]));
    assert!(!std::fs::read_to_string(run_dir.join("haproxy.cfg")).unwrap().contains("backend broken"));
    assert_eq!(get(&cluster, port, "/first/x").await, (200, "a-1 /x".to_string()));
    assert_eq!(get(&cluster, port, "/second/x").await.0, 404);
    drop(sherlock);
}
