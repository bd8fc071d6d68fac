//! Benchmark: reconcile a routes repo of 1,000 services with 10,000 live
//! instances — parse and validate every routes file, then merge with the
//! registry into a snapshot's services. Target: under 50 ms.
//!
//! `cargo bench --bench reconcile` (plain timing loop, no harness: the
//! figures are medians over repeated runs in one process).

use std::time::{Duration, Instant};

use dstack::directory::merge::merge;
use dstack::model::{Heartbeat, InstanceId};

const SERVICES: usize = 1_000;
const INSTANCES: usize = 10_000;

fn main() {
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` measures.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // One file per service, half of them canaries with a per-client entry.
    let files: Vec<(String, String)> = (0..SERVICES)
        .map(|i| {
            let text = if i % 2 == 0 {
                format!("# service {i}\nsvc{i}:\n  v1: 90\n  v2: 10\n")
            } else {
                format!("svc{i}:\n  weights: {{v1: 70, v2: 30}}\n  clients:\n    monolith: {{v1: 50, v2: 50}}\n")
            };
            (format!("routes/svc{i}.yaml"), text)
        })
        .collect();
    let instances: Vec<(InstanceId, Heartbeat)> = (0..INSTANCES)
        .map(|i| {
            let service = i % SERVICES;
            let version = if i % 10 == 0 { "v2" } else { "v1" };
            let hb = Heartbeat {
                service: format!("svc{service}").parse().unwrap(),
                version: version.parse().unwrap(),
                url: format!("http://10.{}.{}.{}:8080/svc{service}", i / 65536, (i / 256) % 256, i % 256)
                    .parse()
                    .unwrap(),
                ttl_ms: 3000,
            };
            (format!("svc{service}-{version}-{i:08x}").parse().unwrap(), hb)
        })
        .collect();

    let mut parse_times = Vec::new();
    let mut merge_times = Vec::new();
    let mut total_times = Vec::new();
    for _ in 0..30 {
        let t0 = Instant::now();
        let routes = dstack::routes::parse_files(files.iter().map(|(p, t)| (p.as_str(), t.as_str()))).unwrap();
        let t1 = Instant::now();
        let merged = merge(instances.iter().map(|(i, h)| (i, h)), &routes);
        let t2 = Instant::now();
        assert_eq!(merged.services.len(), SERVICES);
        parse_times.push(t1 - t0);
        merge_times.push(t2 - t1);
        total_times.push(t2 - t0);
    }
    let report = |name: &str, times: &mut Vec<Duration>| {
        times.sort();
        let median = times[times.len() / 2];
        let worst = times[times.len() - 1];
        println!("{name:<28} median {:>8.2} ms   max {:>8.2} ms", ms(median), ms(worst));
    };
    println!("reconcile: {SERVICES} services, {INSTANCES} instances, 30 runs");
    report("parse + validate", &mut parse_times);
    report("merge into snapshot", &mut merge_times);
    report("total (target < 50 ms)", &mut total_times);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
