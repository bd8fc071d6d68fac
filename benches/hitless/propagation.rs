//! Benchmark 1, propagation: a directory change until HAProxy's runtime state shows it.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::env::{backend, figure, ms, pct, ratio, Delta, Env, Method, Section, POOL};

const SERVICES: usize = 10;
const CHANGES: usize = 200;

struct PropRun {
    method: Method,
    adds: Vec<Duration>,
    removes: Vec<Duration>,
    delta: Delta,
    wall: Duration,
}

impl PropRun {
    fn all(&self) -> Vec<Duration> {
        self.adds.iter().chain(&self.removes).copied().collect()
    }
}

async fn one(env: &Env, method: Method) -> PropRun {
    let mut stage = env.stage(method, "p", SERVICES, 3).await;
    let before = stage.counts().await;
    let (mut adds, mut removes) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for k in 0..CHANGES / 2 {
        let service = stage.service(&format!("p{}", k % SERVICES));
        let id = format!("{service}-x{k}");
        let (_, sent) = stage.add(&service, &id, env.port(k % POOL)).await;
        adds.push(stage.target().until(&backend(&service), &id, true, sent).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (_, sent) = stage.remove(&id).await;
        removes.push(stage.target().until(&backend(&service), &id, false, sent).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wall = started.elapsed();
    let delta = stage.counts().await.since(&before);
    stage.finish().await;
    PropRun { method, adds, removes, delta, wall }
}

pub async fn run(env: Arc<Env>) -> Section {
    let mut runs = Vec::new();
    for method in [Method::Runtime, Method::Naive, Method::Runtime50, Method::Reload] {
        eprintln!("propagation: {}", method.label());
        let run = one(&env, method).await;
        eprintln!(
            "  p50 {:.1} ms  p99 {:.1} ms  reloads (own / HAProxy) {}",
            ms(pct(&run.all(), 50.0)),
            ms(pct(&run.all(), 99.0)),
            run.delta.reloads_cell()
        );
        runs.push(run);
    }
    let naive = runs.iter().find(|r| r.method == Method::Naive).unwrap();
    let (n50, n99) = (ms(pct(&naive.all(), 50.0)), ms(pct(&naive.all(), 99.0)));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## 1. Propagation: directory change → HAProxy runtime state\n\n\
         {CHANGES} changes per method ({} registrations of a new instance + {} deregistrations), \
         one at a time, over {SERVICES} services of 3 instances; timed from just before the \
         `PUT`/`DELETE /v1/instances/{{id}}` to the first `show servers state` on the admin socket \
         (polled every ~1 ms) that shows the server in service / out of service (gone, draining or in \
         maintenance). Reloads are counted twice: by the proxy (sherlock's `dstack_sherlock_reloads_total`, \
         the naive loop's `-sf` runs) and by HAProxy (the master's reload counter in `show proc`; for the \
         naive daemons, the new processes that wrote the pid file); the worker column gives the serving \
         worker pids before → after.\n\n\
         | method | p50 | p99 | max | p50 add / remove | reloads (own / HAProxy) | HAProxy worker | target p99 < 100 ms | naive ÷ this (p50, p99) |\n\
         |---|---|---|---|---|---|---|---|---|",
        CHANGES / 2,
        CHANGES / 2
    );
    for r in &runs {
        let all = r.all();
        let (p50, p99) = (ms(pct(&all, 50.0)), ms(pct(&all, 99.0)));
        let _ = writeln!(
            out,
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} / {:.1} ms | {} | {} | {} | {} |",
            r.method.label(),
            p50,
            p99,
            ms(pct(&all, 100.0)),
            ms(pct(&r.adds, 50.0)),
            ms(pct(&r.removes, 50.0)),
            r.delta.reloads_cell(),
            r.delta.workers_cell(),
            if p99 < 100.0 { "met" } else { "**missed**" },
            if r.method == Method::Naive {
                "—".to_string()
            } else {
                format!("{}, {}", ratio(n50, p50), ratio(n99, p99))
            }
        );
    }
    let walls: Vec<String> =
        runs.iter().map(|r| format!("{} {:.1} s", r.method.prefix(), r.wall.as_secs_f64())).collect();
    let _ = writeln!(out, "\nWall time per method: {}.", walls.join(", "));
    let mut figures = Vec::new();
    for r in &runs {
        let label = r.method.label();
        figures.push(figure(format!("1 propagation p50 · {label}"), ms(pct(&r.all(), 50.0)), "ms"));
        figures.push(figure(format!("1 propagation p99 · {label}"), ms(pct(&r.all(), 99.0)), "ms"));
        figures.push(figure(format!("1 propagation, reloads · {label}"), r.delta.reloads as f64, ""));
    }
    Section { text: out, figures }
}
