//! Benchmark 5, sherlock with 1,000 services and 10,000 instances: render + diff in
//! process, and one weight change applied to a real HAProxy against the
//! reload the naive method needs for it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use dstack::model::{Backend, ServiceBackends, Snapshot};
use dstack::sherlock::haproxy::{Haproxy, Paths};
use dstack::sherlock::render::{self, Renderer, Site};
use dstack::sherlock::runtime;

use crate::capacity::{INSTANCES, SERVICES};
use crate::common::free_port;
use crate::env::{ms, pct, ratio};

fn big_snapshot() -> Snapshot {
    let mut snapshot = Snapshot { index: 1, ..Snapshot::default() };
    for s in 0..SERVICES {
        let backends = (0..INSTANCES / SERVICES)
            .map(|j| {
                let i = s * (INSTANCES / SERVICES) + j;
                Backend {
                    id: format!("svc{s}-v1-{i:05}").parse().unwrap(),
                    url: format!("http://127.0.{}.{}:{}/svc{s}", i / 256 % 256, i % 256, 20_000 + i % 30_000)
                        .parse()
                        .unwrap(),
                    version: "v1".parse().unwrap(),
                    weight: 10,
                }
            })
            .collect();
        snapshot.services.insert(format!("svc{s}").parse().unwrap(), ServiceBackends { backends });
    }
    snapshot
}

/// The snapshot with one server's weight changed (10 <-> 20), and where.
fn one_weight_changed(snapshot: &Snapshot, r: usize) -> (Snapshot, String, String, u32) {
    let mut next = snapshot.clone();
    next.index += 1;
    let (name, svc) = next.services.iter_mut().nth((r * 7) % SERVICES).unwrap();
    let name = format!("svc_{name}");
    let n = svc.backends.len();
    let backend = &mut svc.backends[r % n];
    backend.weight = if backend.weight == 10 { 20 } else { 10 };
    let (server, weight) = (backend.id.to_string(), backend.weight);
    (next, name, server, weight)
}

fn stats(v: &[Duration]) -> String {
    format!("median {:.2} ms, max {:.2} ms", ms(pct(v, 50.0)), ms(pct(v, 100.0)))
}

pub async fn run() -> String {
    const RUNS: usize = 30;
    const CHANGES: usize = 50;
    const RELOADS: usize = 5;
    let tmp = tempfile::Builder::new().prefix("dstack-bench").tempdir().unwrap();
    let paths = Paths::new(tmp.path());
    let site = Site { bind: format!("127.0.0.1:{}", free_port()), admin_socket: paths.admin_socket.clone() };
    let renderer = Renderer::new(None).unwrap();
    let mut snapshot = big_snapshot();
    let mut running = renderer.render(&site, &snapshot).unwrap();
    // sherlock keeps the running config's shape; only the candidate is read.
    let mut running_shape = runtime::Shape::of(&running);

    // Render + diff (and the runtime plan sherlock makes from the diff).
    let (mut renders, mut diffs, mut plans, mut totals) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..RUNS {
        let (next, ..) = one_weight_changed(&snapshot, r);
        let t0 = Instant::now();
        let candidate = renderer.render(&site, &next).unwrap();
        let t1 = Instant::now();
        let d = render::diff(&running, &candidate);
        let t2 = Instant::now();
        let ops = runtime::plan(&running_shape, &runtime::Shape::of(&candidate), &BTreeMap::new());
        let t3 = Instant::now();
        assert!(d.is_some() && ops.as_ref().is_some_and(|o| o.len() == 1), "one weight change is one runtime op");
        renders.push(t1 - t0);
        diffs.push(t2 - t1);
        plans.push(t3 - t2);
        totals.push(t2 - t0);
    }
    eprintln!("scale: render+diff {}", stats(&totals));

    // A real HAProxy running the 10,000-server config.
    std::fs::write(site.services_map(), render::render_map(&snapshot).unwrap()).unwrap();
    std::fs::write(&paths.config, &running).unwrap();
    let mut haproxy = Haproxy::new("haproxy".into(), paths.clone(), site.bind.parse().unwrap());
    let t0 = Instant::now();
    haproxy.check(&paths.config).await.unwrap();
    let first_check = t0.elapsed();
    let t0 = Instant::now();
    haproxy.start().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while haproxy.runtime_command("show info").await.is_err() {
        assert!(Instant::now() < deadline, "haproxy's admin socket did not answer");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cold_start = t0.elapsed();

    // One weight change at a time through the Runtime API.
    let (mut applies, mut commands, mut end_to_end) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..CHANGES {
        let (next, backend, server, weight) = one_weight_changed(&snapshot, RUNS + r);
        let t0 = Instant::now();
        let candidate = renderer.render(&site, &next).unwrap();
        render::diff(&running, &candidate).expect("a difference");
        let t1 = Instant::now();
        let shape = runtime::Shape::of(&candidate);
        let ops = runtime::plan(&running_shape, &shape, &BTreeMap::new()).expect("a runtime change");
        let t2 = Instant::now();
        for command in ops.iter().flat_map(runtime::Op::commands) {
            let answer = haproxy.runtime_command(&command).await.unwrap();
            assert!(answer.trim().is_empty(), "haproxy refused {command}: {answer}");
        }
        let t3 = Instant::now();
        applies.push(t3 - t1);
        commands.push(t3 - t2);
        end_to_end.push(t3 - t0);
        let state = haproxy.runtime_command(&format!("show servers state {backend}")).await.unwrap();
        let state = runtime::parse_servers_state(&state);
        assert_eq!(state[&(backend, server)].weight, weight, "the weight is in force");
        running = candidate;
        running_shape = shape;
        snapshot = next;
    }
    eprintln!("scale: weight change applied {}", stats(&applies));

    // The naive figure: the same change as `haproxy -c` and a reload.
    let (mut checks, mut reloads) = (Vec::new(), Vec::new());
    for r in 0..RELOADS {
        let (next, ..) = one_weight_changed(&snapshot, RUNS + CHANGES + r);
        let candidate = renderer.render(&site, &next).unwrap();
        std::fs::write(&paths.candidate, &candidate).unwrap();
        let t0 = Instant::now();
        haproxy.check(&paths.candidate).await.unwrap();
        let t1 = Instant::now();
        std::fs::rename(&paths.candidate, &paths.config).unwrap();
        haproxy.reload().await.unwrap();
        let t2 = Instant::now();
        checks.push(t1 - t0);
        reloads.push(t2 - t0);
        running = candidate;
        snapshot = next;
    }
    haproxy.stop().await;
    drop(running);
    drop(tmp);
    eprintln!("scale: check + reload {}", stats(&reloads));

    let render_diff = ms(pct(&totals, 50.0));
    let apply = ms(pct(&applies, 50.0));
    let reload = ms(pct(&reloads, 50.0));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## 5. sherlock with {SERVICES} services and {INSTANCES} instances\n\n\
         In process: `Renderer::render` of a snapshot with one weight changed, `render::diff` against the \
         running config, and `runtime::plan` ({RUNS} runs). Then a real HAProxy started on that \
         config (master-worker, as sherlock runs it) and {CHANGES} single weight changes applied through the \
         Runtime API (`runtime::plan` + `set server … weight` on the admin socket, confirmed by \
         `show servers state`), against the reload the naive method needs for the same change \
         (`haproxy -c` + master `reload`, waiting for the new worker; {RELOADS} runs).\n\n\
         | figure | measured | target | verdict | naive figure | naive ÷ this |\n|---|---|---|---|---|---|\n\
         | render + diff | {} | < 50 ms | {} | — | — |\n\
         | — render alone / diff alone / runtime plan | {:.2} / {:.2} / {:.2} ms (medians) | | | | |\n\
         | single weight change applied (plan + Runtime API) | {} | < 10 ms | {} | check + reload: {} | {} |\n\
         | — the Runtime API command alone | {} | | | `haproxy -c` alone: {} | |\n\
         | — end to end (render + diff + plan + command) | {} | | | | |\n\
         | cold start of HAProxy on the config (`haproxy -c`, then start) | {:.0} ms + {:.0} ms | | | | |",
        stats(&totals),
        if render_diff < 50.0 { "met" } else { "**missed**" },
        ms(pct(&renders, 50.0)),
        ms(pct(&diffs, 50.0)),
        ms(pct(&plans, 50.0)),
        stats(&applies),
        if apply < 10.0 { "met" } else { "**missed**" },
        stats(&reloads),
        ratio(reload, apply),
        stats(&commands),
        stats(&checks),
        stats(&end_to_end),
        ms(first_check),
        ms(cold_start),
    );
    out
}
