//! Request routing: req/s through HAProxy to the last of 10 services and to
//! the last of 1,000, with the config sherlock renders (one `services.map`
//! lookup on the first path segment), and with the rule per service it
//! rendered before (`use_backend svc_X if { path /X } || { path_beg /X/ }`,
//! evaluated in order), kept here as the baseline.
//!
//! Each backend answers from HAProxy itself (an `http-request return` put
//! in every backend), so the figure is the frontend's routing cost and not
//! an instance's. `cargo bench --bench routing`; needs `haproxy` (2.6+) and
//! `wrk` on the PATH. BENCHMARKS.md, "Routing by map".

use std::path::Path;
use std::process::Command;

use dstack::model::{Backend, ServiceBackends, Snapshot};
use dstack::sherlock::haproxy::{Haproxy, Paths};
use dstack::sherlock::render::{self, Renderer, Site};

/// wrk's connections, as in the figures.
const CONNECTIONS: &str = "16";
/// How long wrk runs for each figure.
const SECONDS: &str = "3";
/// Rounds of (last of 10, last of 1,000), back to back.
const ROUNDS: usize = 5;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Routing {
    /// Today's frontend: one map lookup.
    Map,
    /// The baseline: one `use_backend ... if` rule per service, in order.
    Rules,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `count` services, `svc0000` onwards, one instance each (on a port nothing
/// listens on: the backends answer by themselves).
fn snapshot(count: usize) -> Snapshot {
    let mut snapshot = Snapshot { index: 1, ..Snapshot::default() };
    for s in 0..count {
        let backend = Backend {
            id: format!("svc{s:04}-v1-0001").parse().unwrap(),
            url: format!("http://127.0.0.1:9/svc{s:04}").parse().unwrap(),
            version: "v1".parse().unwrap(),
            weight: 1,
        };
        snapshot.services.insert(format!("svc{s:04}").parse().unwrap(), ServiceBackends { backends: vec![backend] });
    }
    snapshot
}

/// The rendered config, with every backend answering by itself and, for
/// the baseline, the map lookup replaced by the rules it replaced.
fn config(renderer: &Renderer, site: &Site, snapshot: &Snapshot, routing: Routing) -> String {
    let rendered = renderer.render(site, snapshot).unwrap();
    let lookup = format!("    use_backend %[path,field(2,/),map_str({})]\n", site.services_map().display());
    assert!(rendered.contains(&lookup), "the rendered frontend routes by the map");
    let mut config = rendered.replace(
        "    balance roundrobin\n",
        "    balance roundrobin\n    http-request return status 200 content-type text/plain string ok\n",
    );
    if routing == Routing::Rules {
        let rules: String = snapshot
            .services
            .keys()
            .map(|s| format!("    use_backend svc_{s} if {{ path /{s} }} || {{ path_beg /{s}/ }}\n"))
            .collect();
        config = config.replace(&lookup, &rules);
    }
    // No health checks: the servers are never reached.
    config.replace(" check inter 2s fastinter 500ms fall 2 rise 2 on-marked-down shutdown-sessions", "")
}

/// req/s wrk reaches on `url`.
fn wrk(url: &str) -> f64 {
    let out = Command::new("wrk")
        .args(["-t2", "-c", CONNECTIONS, "-d", &format!("{SECONDS}s"), url])
        .output()
        .expect("wrk on the PATH (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("Non-2xx"), "wrk {url}:\n{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec from wrk:\n{text}"))
}

/// One HAProxy running the rendered config for `count` services; the URL
/// of the last of them.
async fn start(dir: &Path, count: usize, routing: Routing) -> (Haproxy, String) {
    let run_dir = dir.join(format!("{count}-{routing:?}"));
    std::fs::create_dir_all(&run_dir).unwrap();
    let paths = Paths::new(&run_dir);
    let site = Site { bind: format!("127.0.0.1:{}", free_port()), admin_socket: paths.admin_socket.clone() };
    let snapshot = snapshot(count);
    let config = config(&Renderer::new(None).unwrap(), &site, &snapshot, routing);
    std::fs::write(site.services_map(), render::render_map(&snapshot).unwrap()).unwrap();
    std::fs::write(&paths.config, config).unwrap();
    let mut haproxy = Haproxy::new("haproxy".into(), paths, site.bind.parse().unwrap());
    haproxy.start().await.unwrap();
    let last = snapshot.services.keys().last().unwrap().to_string();
    let url = format!("http://{}/{last}/x", site.bind);
    let answer = reqwest::get(&url).await.unwrap();
    assert_eq!(answer.status(), 200, "{url} reaches its backend");
    (haproxy, url)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// req/s to the last of 10 and of 1,000 services, and their ratio: the
/// medians over ROUNDS rounds, each measuring 10 then 1,000 right after
/// (the ratio is taken within a round, so a noisy neighbour's load hits
/// both sides of it alike).
async fn measure(dir: &Path, routing: Routing) -> (f64, f64, f64) {
    let (mut ten, ten_url) = start(dir, 10, routing).await;
    let (mut thousand, thousand_url) = start(dir, 1_000, routing).await;
    let (tens, thousands) = tokio::task::spawn_blocking(move || {
        // A short run of each warms up.
        for url in [&ten_url, &thousand_url] {
            let _ = Command::new("wrk").args(["-t1", "-c", CONNECTIONS, "-d", "1s", url]).output();
        }
        (0..ROUNDS).map(|_| (wrk(&ten_url), wrk(&thousand_url))).unzip::<_, _, Vec<f64>, Vec<f64>>()
    })
    .await
    .unwrap();
    ten.stop().await;
    thousand.stop().await;
    let ratios = tens.iter().zip(&thousands).map(|(t, k)| k / t).collect();
    eprintln!("routing {routing:?}: last of 10 {tens:.0?}, last of 1,000 {thousands:.0?}");
    (median(tens), median(thousands), median(ratios))
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` measures.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = tempfile::Builder::new().prefix("dstack-bench-routing").tempdir().unwrap();
    let mut rows = Vec::new();
    for routing in [Routing::Map, Routing::Rules] {
        rows.push((routing, measure(dir.path(), routing).await));
    }
    println!(
        "routing: req/s through HAProxy to the last of N services (wrk -t2 -c{CONNECTIONS} -d{SECONDS}s, \
         {ROUNDS} rounds, medians; each backend answering by itself)"
    );
    println!("| frontend | last of 10 | last of 1,000 | 1,000 / 10 |");
    println!("|---|---|---|---|");
    for (routing, (ten, thousand, ratio)) in &rows {
        let name = match routing {
            Routing::Map => "one map lookup (sherlock's)",
            Routing::Rules => "a rule per service (before)",
        };
        println!("| {name} | {ten:.0} | {thousand:.0} | {ratio:.2} |");
    }
    let (_, (_, _, ratio)) = rows[0];
    println!(
        "map: last of 1,000 / last of 10 = {ratio:.2} (goal > 0.9): {}",
        if ratio > 0.9 { "met" } else { "NOT met" }
    );
}
