//! Benchmark 3, HAProxy reloads caused by 1,000 instance changes.
//!
//! Each change is waited for in HAProxy's own state (`show servers state`)
//! before the next is sent, so that every change is one snapshot that the
//! proxy really applies. (Waiting for the index a write answered used to
//! return at once: the directory answered its current index, and the
//! changes piled up into a few dozen snapshots.)

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::env::{backend, figure, ms, pct, ratio, snapshots_carrying, Delta, Env, Method, Section, POOL};

const CHANGES: usize = 1_000;
const SERVICES: usize = 10;

struct ReloadRun {
    method: Method,
    delta: Delta,
    /// Distinct (epoch, index) the writes answered; None from a directory without epochs.
    carried: Option<usize>,
    latencies: Vec<Duration>,
    wall: Duration,
}

async fn one(env: &Env, method: Method) -> ReloadRun {
    let mut stage = env.stage(method, "r", SERVICES, 2).await;
    let before = stage.counts().await;
    let (mut written, mut latencies) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for k in 0..CHANGES {
        let service = stage.service(&format!("r{}", (k / 2) % SERVICES));
        let id = format!("{service}-x{}", k / 2);
        let added = k % 2 == 0;
        let (answer, sent) =
            if added { stage.add(&service, &id, env.port(k % POOL)).await } else { stage.remove(&id).await };
        latencies.push(stage.target().until(&backend(&service), &id, added, sent).await);
        written.push(answer);
    }
    let wall = started.elapsed();
    let delta = stage.counts().await.since(&before);
    stage.finish().await;
    ReloadRun { method, delta, carried: snapshots_carrying(&written), latencies, wall }
}

pub async fn run(env: Arc<Env>) -> Section {
    let mut runs = Vec::new();
    for method in [Method::Runtime, Method::Naive] {
        eprintln!("reloads: {}", method.label());
        let run = one(&env, method).await;
        let d = &run.delta;
        eprintln!(
            "  {CHANGES} changes: {} snapshots published, {} applied ({} at runtime); reloads (own / HAProxy) {}; {:.1} s",
            d.published,
            d.applies,
            d.runtime_applies,
            d.reloads_cell(),
            run.wall.as_secs_f64()
        );
        runs.push(run);
    }
    let naive = runs.iter().find(|r| r.method == Method::Naive).unwrap().delta.reloads;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## 3. HAProxy reloads caused by {CHANGES} instance changes\n\n\
         {CHANGES} changes (alternately register a new instance and deregister it, over {SERVICES} services \
         of 2 instances), one at a time: each is sent once HAProxy's `show servers state` on the admin socket \
         shows the one before it (the server in service, or out of service). Beside the changes sent: the \
         snapshots the directory published over the run (its `dstack_directory_snapshots_published_total`), \
         the snapshots the writes landed in (distinct `(epoch, index)` answered by the `PUT`s and `DELETE`s), \
         and the snapshots the proxy applied (sherlock's `dstack_sherlock_apply_seconds_count`, split into \
         `dstack_sherlock_runtime_applies_total` / `dstack_sherlock_reloads_total` / \
         `dstack_sherlock_unchanged_total`; the naive loop's renders, each one an `haproxy -sf` but the \
         first). Reloads are counted twice: by the proxy (sherlock's counter, the naive loop's `-sf` runs) \
         and by HAProxy (the master's reload counter in `show proc` before and after; for the naive daemons, \
         the new processes that wrote the pid file).\n\n\
         | method | changes | snapshots published | snapshots the writes landed in | applied (runtime / reload / unchanged) | reloads (own / HAProxy) | HAProxy worker | target 0 | naive ÷ this | wall time (per change p50 / p99) |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    );
    for r in &runs {
        let d = &r.delta;
        let applied = if r.method == Method::Naive {
            format!("{} (renders)", d.applies)
        } else {
            format!("{} ({} / {} / {})", d.applies, d.runtime_applies, d.reloads, d.unchanged)
        };
        let carried = r.carried.map(|n| n.to_string()).unwrap_or_else(|| "— (the directory answers no epoch)".into());
        let _ = writeln!(
            out,
            "| {} | {CHANGES} | {} | {carried} | {applied} | {} | {} | {} | {} | {:.1} s ({:.1} / {:.1} ms) |",
            r.method.label(),
            d.published,
            d.reloads_cell(),
            d.workers_cell(),
            if d.reload_free() { "met" } else { "**missed**" },
            if r.method == Method::Naive { "—".into() } else { ratio(naive as f64, d.reloads as f64) },
            r.wall.as_secs_f64(),
            ms(pct(&r.latencies, 50.0)),
            ms(pct(&r.latencies, 99.0)),
        );
    }
    let mut figures = Vec::new();
    for r in &runs {
        let label = r.method.label();
        figures.push(figure(format!("3 reloads for {CHANGES} changes · {label}"), r.delta.reloads as f64, ""));
        figures.push(figure(format!("3 per change p50 · {label}"), ms(pct(&r.latencies, 50.0)), "ms"));
        figures.push(figure(format!("3 per change p99 · {label}"), ms(pct(&r.latencies, 99.0)), "ms"));
        figures.push(figure(format!("3 wall time of {CHANGES} changes · {label}"), r.wall.as_secs_f64(), "s"));
    }
    Section { text: out, figures }
}
